"""Out-of-distribution check on real data: the profile of the training cases of benchmarks/folds.py (run it first), then
how many held-out hippocampus cases are flagged (false alarms) and whether the real CT and whole-head MR are.

    python benchmarks/ood_check.py
"""
import glob

from segment.data.profile import dataset_profile, ood_reasons
from segment.io.case import read_case
from segment.io.dataset import discover
ds = discover("/work/bench/folds/train_data", check=False)
prof = dataset_profile(ds)
print("shape range", prof["shape"])
test = sorted(glob.glob("/work/shared/data/hippocampus/imagesTr/*.nii.gz"))[-40:]
flagged = [f for f in test if ood_reasons(prof, *(lambda c: (c.channels, c.geometry))(read_case([f])))]
print(f"held-out hippocampus flagged: {len(flagged)} of {len(test)}")
for f in flagged[:5]:
    c = read_case([f]); print(f.split('/')[-1], ood_reasons(prof, c.channels, c.geometry))
for f in sorted(glob.glob("/work/shared/data/real_ct_mr/images/*.nii.gz")):
    c = read_case([f]); print(f.split('/')[-1], ood_reasons(prof, c.channels, c.geometry))
