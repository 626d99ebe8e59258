"""The CMIL dataset layout and the marks of our synthetic copy of it: names only.

The CMIL layout's names (class folders, `public.csv`, the biopsy-id rule) and the synthetic data's marks
(`MARKER_FILE`, `BIOPSY_PREFIX`, the site rule). Ingest, predict, doctor and the workspace read folders by
these names; the synthetic generator (`sample_data.py`) imports them to write them. No stage imports the
generator, so editing it reruns nothing.
"""

SCLEROTIC_DIR = "globally_sclerotic_glomeruli"  # label 1
NON_SCLEROTIC_DIR = "non_globally_sclerotic_glomeruli"  # label 0
LABELS_CSV = "public.csv"
CMIL_GROUP_REGEX = r"^(?P<group>.+?)_PAS_"  # the shipped ingest.group_regex: the biopsy id before _PAS_

# The synthetic sample data: ingest refuses it mixed with real images, use-data refuses it as the user's data.
MARKER_FILE = "SYNTHETIC_DATA.txt"
BIOPSY_PREFIX = "SYNTH-"  # every synthetic biopsy id starts with it
# The ingest.site_regex for a multi-site sample (`glomeruli sample-data --sites N`): the site inside the biopsy id,
# SYNTH-SITE2_B005_PAS_1of7_<hex>.png.
SYNTHETIC_SITE_REGEX = r"^SYNTH-(?P<site>SITE\d+)_"
# The site of every image when the data names none (ingest.site_regex null): one site. Here, not in h5store, so
# that ingest's labelling (which predict runs) does not import h5py.
SINGLE_SITE = "all"
