"""The paper's datasets as the authors ran them (issue 32), on fake trees in the public layouts
with the real id sets: split membership of every scheme, LungCT's 2 mm resampling and
crop-or-pad with keypoints carried in world coordinates, ACDC's 1.8 mm labelled middle slice,
NLST's body mask, label maps checked against their image's affine, ``make-labels`` on a fake
TotalSegmentator tree, one message listing every missing file, and ``python -m datasets check``.

Only the images whose geometry a test checks have real shapes; the other cases are tiny.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets as D  # noqa: E402
import eval_metrics  # noqa: E402
from datasets import splits as S  # noqa: E402

nib = pytest.importorskip("nibabel")
scipy_spatial = pytest.importorskip("scipy.spatial")


def save(path, arr, affine):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))


def affine(zooms, origin=(-150.0, -120.0, -300.0)):
    a = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])  # x flipped, as many CT headers
    a[:3, 3] = origin
    return a


def world(aff, ijk):
    ijk = np.atleast_2d(np.asarray(ijk, float))
    return (np.c_[ijk, np.ones(len(ijk))] @ np.asarray(aff).T)[:, :3]


def nums(ids):
    return [int(i.rsplit("_", 1)[-1].replace("patient", "")) for i in ids]


TINY = (6, 4, 6)


def tiny_case(rng):
    img = rng.uniform(-1000, 400, size=TINY).astype(np.int16)
    lab = rng.integers(0, 4, size=TINY).astype(np.uint8)
    return img, lab


# ------------------------------------------------------------------------------------- NLST
@pytest.fixture(scope="module")
def nlst(tmp_path_factory):
    """The 2023 archive layout (``NLST/`` inside the folder given), the authors' id union plus one
    id in no authors' list (0150); NLST_dataset.json in the real format; the val pairs have no
    keypoint files."""
    root = tmp_path_factory.mktemp("nlst")
    data, labels = root / "NLST", root / "labels"
    rng = np.random.default_rng(0)
    ids = [*range(1, 111), 150, *range(200, 300)]
    aff = affine((1.5, 1.5, 1.5))
    for n in ids:
        for role in ("0000", "0001"):
            stem = f"NLST_{n:04d}_{role}"
            img, lab = tiny_case(rng)
            save(data / "imagesTr" / f"{stem}.nii.gz", img, aff)
            save(labels / f"{stem}.nii.gz", lab, aff)
            if not 101 <= n <= 110:
                os.makedirs(data / "keypointsTr", exist_ok=True)
                np.savetxt(data / "keypointsTr" / f"{stem}.csv", [[1.0, 1.0, 2.0], [3.0, 2.0, 4.0]],
                           delimiter=",", fmt="%.1f")
    entry = lambda n: {"fixed": f"./imagesTr/NLST_{n:04d}_0000.nii.gz",  # noqa: E731
                       "moving": f"./imagesTr/NLST_{n:04d}_0001.nii.gz"}
    (data / "NLST_dataset.json").write_text(json.dumps({
        "name": "NLST", "tensorImageShape": {"0": [224, 192, 224]},
        "training_paired_images": [entry(n) for n in ids if not 101 <= n <= 110],
        "registration_val": [entry(n) for n in range(101, 111)]}))
    return root, labels


def test_nlst_authors_split_and_subfolder(nlst):
    root, labels = nlst
    ds = D.get_dataset("nlst", str(root), label_dir=str(labels), ndim=3)  # descends into NLST/
    assert ds.data_dir == str(root / "NLST") and ds.split_scheme == "authors"
    train, val, test = (ds.split_ids(s) for s in D.SPLITS)
    assert nums(test) == list(range(1, 31)) and nums(val) == list(range(101, 111))
    assert nums(train) == [*range(31, 101), *range(200, 300)] and len(train) == 170
    assert "NLST_0030" in test and "NLST_0030" not in train  # the authors' overlap is not copied
    assert "NLST_0150" not in ds.all_ids()
    ordered = D.get_dataset("nlst", str(root), label_dir=str(labels), ndim=3, split_scheme="ordered")
    assert [len(ordered.split_ids(s)) for s in D.SPLITS] == D.split_sizes(211, (169, 10, 30))
    assert ordered.split_ids("train")[0] == "NLST_0001"  # contiguous in sorted order
    with pytest.raises(ValueError, match="paper-text"):
        D.get_dataset("nlst", str(root), label_dir=str(labels), split_scheme="paper-text")


def test_nlst_pairs_without_keypoints_score_all_but_tre(nlst):
    root, labels = nlst
    ds = D.get_dataset("nlst", str(root), label_dir=str(labels), ndim=3, body_mask=False)
    val = ds.load_pair("NLST_0101")
    assert val.fixed_kp is None and val.moving_kp is None
    disp = np.zeros(TINY + (3,), np.float32)
    m = eval_metrics.registration_metrics(val.fixed_seg, val.moving_seg, disp, 3, val.spacing)
    assert np.isnan(m["tre_mean"]) and np.isfinite(m["mean_dice"])
    test = ds.load_pair("NLST_0001")
    np.testing.assert_allclose(test.fixed_kp, [[1, 1, 2], [3, 2, 4]])
    assert ds.keypoint_status()["NLST_0101"] is False and ds.keypoint_status()["NLST_0001"] is True


def test_split_scheme_is_part_of_the_data_identity(nlst):
    from hypermorph_spatially_adaptive import provenance

    root, labels = nlst
    kw = dict(label_dir=str(labels), ndim=3, body_mask=False)
    authors = D.get_dataset("nlst", str(root), **kw)
    ordered = D.get_dataset("nlst", str(root), split_scheme="ordered", **kw)
    h_a, h_o = provenance.data_hashes(authors, ["val"]), provenance.data_hashes(ordered, ["val"])
    assert h_a["val"] != h_o["val"]
    assert provenance.data_mismatches(h_a, h_o, "config.json", "now")  # a run of the other split is refused


def test_check_command_prints_split_and_geometry(nlst, capsys):
    from datasets.commands import main

    root, labels = nlst
    main(["check", "--dataset", "nlst", "--data-dir", str(root), "--label-dir", str(labels), "--ndim", "3"])
    out = capsys.readouterr().out
    assert "split scheme: authors" in out
    assert "train  170 pairs: NLST_0031..0100, NLST_0200..0299" in out
    assert "val     10 pairs: NLST_0101..0110" in out and "test    30 pairs: NLST_0001..0030" in out
    assert "in no split: 1 pairs (NLST_0150)" in out
    assert "keypoints: 200 of 210 pairs (without: NLST_0101..0110" in out
    assert "geometry: 3D 6 x 4 x 6 voxels at 1.5 x 1.5 x 1.5 mm" in out
    assert "body mask (convex hull of HU > -20)" in out and "crop_in_loss default: True" in out


def test_nlst_body_mask_real_slice(tmp_path):
    """2D on a real-size 224 x 224 coronal slice (the volume is 224 x 3 x 224): zero outside the convex hull of HU > -20 of the slice
    (reference: the authors' Delaunay point location), foam outside the body zeroed, air inside
    the hull kept."""
    shape = (224, 3, 224)
    aff = affine((1.5, 1.5, 1.5))
    x, z = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    body = ((x - 112) / 90.0) ** 2 + ((z - 110) / 70.0) ** 2 < 1
    body &= ~((np.abs(x - 112) < 12) & (z < 60))  # a notch: inside the hull, outside the body
    sl = np.where(body, 40.0, -600.0)  # -600: foam / blanket outside, air in the notch
    sl[((x - 112) / 50.0) ** 2 + ((z - 120) / 40.0) ** 2 < 1] = -900.0  # lung: the slice minimum
    img = np.repeat(sl[:, None, :], shape[1], axis=1).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[body[:, None, :].repeat(shape[1], axis=1)] = 1
    for role in ("0000", "0001"):
        save(tmp_path / "imagesTr" / f"NLST_0001_{role}.nii", img, aff)
        save(tmp_path / "labels" / f"NLST_0001_{role}.nii", lab, aff)
    ds = D.get_dataset("nlst", str(tmp_path), label_dir=str(tmp_path / "labels"), split_scheme="ordered")
    assert ds.image_shape == (224, 224)
    pair = ds.load_pair("NLST_0001")
    pts = np.argwhere(sl > -20)
    hull = scipy_spatial.Delaunay(pts[scipy_spatial.ConvexHull(pts).vertices])
    inside = hull.find_simplex(np.stack([x, z], -1)) >= 0
    clipped = np.clip(sl, -980, 1518)
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * inside
    np.testing.assert_allclose(pair.fixed[..., 0], expected, atol=1e-6)
    assert pair.fixed[112, 50, 0] > 0 and pair.fixed[5, 5, 0] == 0  # notch kept, foam outside zeroed
    off = D.get_dataset("nlst", str(tmp_path), label_dir=str(tmp_path / "labels"), split_scheme="ordered",
                        body_mask=False).load_pair("NLST_0001")
    assert off.fixed[5, 5, 0] > 0
    # register.py normalizes new images as training did: the body mask by the run's data config
    from hypermorph_spatially_adaptive.pair_registration import intensity_normalizer

    np.testing.assert_allclose(intensity_normalizer({"name": "nlst"})(sl), expected, atol=1e-6)
    unmasked = intensity_normalizer({"name": "nlst", "body_mask": False})(sl)
    np.testing.assert_allclose(unmasked, off.fixed[..., 0], atol=1e-6)
    assert unmasked[5, 5] > 0


def test_label_map_on_another_grid_is_refused(tmp_path):
    """Same shape (axes 0 and 2 are equally long, as NLST's 224 x 192 x 224), axes swapped in
    the header: refused with both affines printed."""
    aff = affine((1.5, 1.5, 1.5))
    swapped = aff[:, [2, 1, 0, 3]]
    rng = np.random.default_rng(1)
    for role in ("0000", "0001"):
        img, lab = tiny_case(rng)
        save(tmp_path / "imagesTr" / f"NLST_0001_{role}.nii.gz", img, aff)
        save(tmp_path / "labels" / f"NLST_0001_{role}.nii.gz", lab, swapped if role == "0001" else aff)
    ds = D.get_dataset("nlst", str(tmp_path), label_dir=str(tmp_path / "labels"), split_scheme="ordered", ndim=3)
    with pytest.raises(ValueError, match=r"NLST_0001_0001.nii.gz is not on the grid") as err:
        ds.load_pair("NLST_0001")
    text = str(err.value)
    assert "image affine:" in text and "label affine:" in text and text.count("-1.5") >= 1 and "1.5" in text


# ----------------------------------------------------------------------------------- LungCT
LUNG_ZOOMS = (1.75, 1.25, 1.75)
LUNG_SHAPE = (192, 192, 208)
SHIFT = np.array([3.0, -4.0, 2.0])  # moving keypoint = fixed + SHIFT raw voxels


def make_lungct(root, big=True):
    """imagesTr 0001-0020, imagesTs 0021-0030 (keypointsTr/Ts); with ``big``, LungCT_0024 (a test
    pair) at the real 192 x 192 x 208 at 1.75 x 1.25 x 1.75 mm, the rest tiny."""
    data, labels = root / "LungCT", root / "labels"
    rng = np.random.default_rng(2)
    aff = affine(LUNG_ZOOMS)
    kp = np.array([[20.0, 30.0, 40.0], [100.0, 96.0, 104.0], [170.0, 150.0, 190.0], [-20.0, 50.0, 50.0]])
    for n in range(1, 31):
        part = "Tr" if n <= 20 else "Ts"
        for role in ("0000", "0001"):
            stem = f"LungCT_{n:04d}_{role}"
            ext = ".nii.gz"
            if n == 24 and big:  # uncompressed: quick to write and read at the real size
                ext = ".nii"
                img = np.full(LUNG_SHAPE, -800, np.int16)
                img[::7, ::5] = 300
                lab = np.zeros(LUNG_SHAPE, np.uint8)
                lab[40:150, 30:160, 20:190] = 1
                points = kp if role == "0000" else kp + SHIFT
            else:
                img, lab = tiny_case(rng)
                points = np.array([[1.0, 1.0, 1.0]])
            save(data / f"images{part}" / f"{stem}{ext}", img, aff)
            save(labels / f"{stem}{ext}", lab, aff)
            os.makedirs(data / f"keypoints{part}", exist_ok=True)
            np.savetxt(data / f"keypoints{part}" / f"{stem}.csv", points, delimiter=",", fmt="%.2f")
    return root, labels, kp


@pytest.fixture(scope="module")
def lungct(tmp_path_factory):
    return make_lungct(tmp_path_factory.mktemp("lungct"))


def test_lungct_authors_split(lungct):
    root, labels, _ = lungct
    ds = D.get_dataset("l2r-lung", str(root), label_dir=str(labels))
    assert ds.ndim == 3 and ds.split_scheme == "authors"
    assert nums(ds.split_ids("train")) == list(range(1, 21))
    assert nums(ds.split_ids("val")) == [21, 22, 23] and nums(ds.split_ids("test")) == [24, 25, 28, 29]
    assert all("imagesTs" in ds.pair_files(p)[0] for p in ds.split_ids("test"))
    ordered = D.get_dataset("l2r-lung", str(root), label_dir=str(labels), split_scheme="ordered")
    assert [len(ordered.split_ids(s)) for s in D.SPLITS] == D.split_sizes(30, (20, 4, 4))


def test_lungct_geometry_and_keypoints_in_world(lungct):
    root, labels, kp = lungct
    ds = D.get_dataset("l2r-lung", str(root), label_dir=str(labels))
    pair = ds.load_pair("LungCT_0024")
    # 2 mm: 192 x 192 x 208 at 1.75/1.25/1.75 -> 168 x 120 x 182, padded (12, 4, 5) to 192 x 128 x 192
    assert ds.image_shape == (192, 128, 192) and pair.fixed.shape == (192, 128, 192, 1)
    assert pair.spacing == (2.0, 2.0, 2.0)
    assert pair.fixed[:12].max() == 0 and pair.fixed[12:180, 4:124, 5:187].min() >= 0
    lab = np.argwhere(pair.fixed_seg == 1)
    np.testing.assert_array_equal(lab.min(0), [12 + 35, 4 + 19, 5 + 17])  # 40 * 0.875, 30 * 0.625, 20 * 0.875
    # the keypoint at raw x = -20 (mm -35, beyond the 12-voxel padding) leaves the grid: dropped, counted
    assert pair.extras["keypoints_total"] == 4 and pair.extras["keypoints_dropped"] == 1
    assert pair.fixed_kp.shape == (3, 3)
    # world round trip: the preprocessed keypoints sit where the raw ones were
    raw_aff = affine(LUNG_ZOOMS)
    np.testing.assert_allclose(world(pair.affine, pair.fixed_kp), world(raw_aff, kp[:3]), atol=1e-4)
    # a known translation gives TRE 0: the raw SHIFT in 2 mm voxels, everywhere
    disp = np.broadcast_to((SHIFT * np.array(LUNG_ZOOMS) / 2.0).astype(np.float32), (192, 128, 192, 3))
    np.testing.assert_allclose(eval_metrics.tre(pair.fixed_kp, pair.moving_kp, disp, pair.spacing), 0, atol=1e-4)
    assert eval_metrics.tre(pair.fixed_kp, pair.moving_kp, 0 * disp, pair.spacing).min() > 5


def test_missing_files_listed_in_one_message(tmp_path):
    import shutil

    root, labels, _ = make_lungct(tmp_path, big=False)
    os.remove(root / "LungCT" / "imagesTs" / "LungCT_0028_0001.nii.gz")
    os.remove(root / "LungCT" / "imagesTr" / "LungCT_0003_0000.nii.gz")
    os.remove(labels / "LungCT_0021_0000.nii.gz")
    shutil.rmtree(root / "LungCT" / "keypointsTs")  # keypoints missing: not an error
    with pytest.raises(FileNotFoundError, match=r"3 file\(s\) not found") as err:
        D.get_dataset("l2r-lung", str(root), label_dir=str(labels))
    text = str(err.value)
    for name in ("imagesTs/LungCT_0028_0001.nii.gz", "imagesTr/LungCT_0003_0000.nii.gz",
                 "labels/LungCT_0021_0000.nii.gz"):
        assert name in text
    # LungCT_0030 (in no authors' list) may be missing: nothing needs it
    os.remove(root / "LungCT" / "imagesTs" / "LungCT_0030_0000.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"3 file\(s\) not found"):
        D.get_dataset("l2r-lung", str(root), label_dir=str(labels))


# ------------------------------------------------------------------------------------- ACDC
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def acdc_case(folder, pid, zooms, shape, ed, es, group, heart=True):
    os.makedirs(folder, exist_ok=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 170\nNbFrame: 30\nWeight: 70\n")
    aff = affine(zooms, origin=(100.0, -80.0, 20.0))
    x, y = np.meshgrid(np.arange(shape[0]) * zooms[0], np.arange(shape[1]) * zooms[1], indexing="ij")
    cx, cy = 0.55 * shape[0] * zooms[0], 0.45 * shape[1] * zooms[1]
    for frame, r in ((ed, 22.0), (es, 14.0)):
        d = np.hypot(x - cx, y - cy)
        sl = np.zeros(shape[:2], np.uint8)
        sl[d < r + 8] = 2
        sl[d < r] = 3
        sl[(d >= r + 8) & (d < r + 20) & (x < cx)] = 1
        lab = np.zeros(shape, np.uint8)
        if heart:
            lab[:, :, 3:7] = sl[:, :, None]
        img = (20 + 200 * (lab == 3) + 90 * (lab == 2) + 60 * (lab == 1)).astype(np.int16)
        save(folder / f"{pid}_frame{frame:02d}.nii.gz", img, aff)
        save(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", lab, aff)


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    """database/training 001-100 (pathology blocks of 20), database/testing 101-150; patients
    003 (1.5625 mm, ED frame 01) and 121 (0.7 mm, ED frame 04) at real sizes, the rest tiny."""
    root = tmp_path_factory.mktemp("acdc")
    for n in range(1, 151):
        pid = f"patient{n:03d}"
        folder = root / "database" / ("training" if n <= 100 else "testing") / pid
        group = GROUPS[(n - 1) // 20] if n <= 100 else GROUPS[n % 5]
        if n == 3:
            acdc_case(folder, pid, (1.5625, 1.5625, 10.0), (216, 256, 10), 1, 12, group)
        elif n == 121:
            acdc_case(folder, pid, (0.7, 0.7, 5.0), (320, 320, 10), 4, 15, group)
        else:
            zooms = (0.7 + 1.25 * (n % 7) / 6, 0.7 + 1.25 * (n % 7) / 6, 10.0)
            acdc_case(folder, pid, zooms, (8, 8, 10), 1, 10, group, heart=False)
    return root


def test_acdc_splits(acdc):
    ds = D.get_dataset("acdc", str(acdc))
    assert ds.split_scheme == "authors"
    assert nums(ds.split_ids("train")) == list(range(1, 101))
    assert nums(ds.split_ids("val")) == list(range(101, 121)) and nums(ds.split_ids("test")) == list(range(121, 151))
    text = D.get_dataset("acdc", str(acdc), split_scheme="paper-text")
    ids = {s: nums(text.split_ids(s)) for s in D.SPLITS}
    assert [len(ids[s]) for s in D.SPLITS] == [50, 20, 30] and max(max(v) for v in ids.values()) == 100
    for g in range(5):  # 10 / 4 / 6 of every pathology group
        block = range(20 * g + 1, 20 * g + 21)
        assert [sum(i in block for i in ids[s]) for s in D.SPLITS] == [10, 4, 6]
        assert ids["test"][6 * g:6 * g + 6] == list(range(20 * g + 15, 20 * g + 21))
    ordered = D.get_dataset("acdc", str(acdc), split_scheme="ordered")
    assert nums(ordered.split_ids("test")) == list(range(106, 151))  # 75/30/45 of the 150 found


@pytest.mark.parametrize("pid,zooms,ed", [("patient003", (1.5625, 1.5625, 10.0), 1),
                                          ("patient121", (0.7, 0.7, 5.0), 4)])
def test_acdc_geometry(acdc, pid, zooms, ed):
    ds = D.get_dataset("acdc", str(acdc))
    pair = ds.load_pair(pid)
    assert pair.spacing == (1.8, 1.8) and pair.fixed.shape == (128, 128, 1)
    assert pair.extras["frames"]["ED"] == ed
    # ED is fixed (LV radius 22 mm), ES moving (14 mm): areas in mm^2 survive resampling
    for seg, r in ((pair.fixed_seg, 22.0), (pair.moving_seg, 14.0)):
        assert abs((seg == 3).sum() * 1.8 ** 2 - np.pi * r * r) < 0.08 * np.pi * r * r
    where = np.argwhere(pair.fixed_seg > 0)
    assert np.all((where.min(0) + where.max(0) + 1) // 2 == 64)  # window centred on the label box
    # the kept slice is the middle of the labelled slices 3..6 (raw index 4.5), within one 1.8 mm voxel
    assert abs(pair.extras["raw_slice"] - 4.5) * zooms[2] <= 1.8
    assert pair.fixed.min() == 0.0 and pair.fixed.max() == 1.0  # min-max per slice
    # the LV centre is at the same world position before and after preprocessing
    raw = nib.load(str(acdc / "database" / ("training" if pid == "patient003" else "testing") / pid
                       / f"{pid}_frame{ed:02d}_gt.nii.gz"))
    raw_c = np.argwhere(np.asarray(raw.dataobj)[:, :, 4] == 3).mean(0)
    new_c = np.argwhere(pair.fixed_seg == 3).mean(0)
    got, want = world(pair.affine, [[*new_c, 0]])[0], world(raw.affine, [[*raw_c, 4]])[0]
    np.testing.assert_allclose(got[:2], want[:2], atol=1.0)


# ------------------------------------------------------------------------- make-labels
def test_make_labels_from_totalsegmentator(tmp_path, capsys):
    from datasets.commands import main

    aff = affine((1.5, 1.5, 1.5))
    shape = (10, 8, 10)
    ts = tmp_path / "ts"
    masks = {
        "lung_upper_lobe_left": (slice(0, 3), slice(0, 8), slice(0, 5)),
        "lung_lower_lobe_right": (slice(0, 3), slice(0, 8), slice(5, 10)),
        "vertebrae_T7": (slice(4, 5), slice(0, 2), slice(0, 10)),
        "rib_left_3": (slice(5, 6), slice(0, 2), slice(0, 10)),
        "sternum": (slice(6, 7), slice(0, 8), slice(0, 1)),
        "liver": (slice(7, 10), slice(0, 8), slice(0, 10)),
        "heart": (slice(3, 4), slice(0, 8), slice(0, 10)),  # not a paper class: ignored
    }
    for case in ("NLST_0001_0000", "NLST_0001_0001"):
        for name, box in masks.items():
            if case.endswith("0001") and name == "liver":
                continue
            m = np.zeros(shape, np.uint8)
            m[box] = 1
            save(ts / case / f"{name}.nii.gz", m, aff)
        save(tmp_path / "imagesTr" / f"{case}.nii.gz", np.zeros(shape, np.int16), aff)
    main(["make-labels", "--ts-dir", str(ts), "--out", str(tmp_path / "labels"), "--images",
          str(tmp_path / "imagesTr")])
    out = capsys.readouterr().out
    lab = np.asarray(nib.load(str(tmp_path / "labels" / "NLST_0001_0000.nii.gz")).dataobj)
    expected = np.zeros(shape, np.uint8)
    expected[0:3] = 1
    expected[4:6, 0:2] = 2
    expected[6, :, 0] = 2
    expected[7:10] = 3
    np.testing.assert_array_equal(lab, expected)
    np.testing.assert_allclose(nib.load(str(tmp_path / "labels" / "NLST_0001_0000.nii.gz")).affine, aff)
    assert "NLST_0001_0000" in out and f"{3 * 8 * 10:>12d}{2 * 2 * 10 + 8:>12d}{3 * 8 * 10:>12d}" in out
    assert "1 case(s) without liver: NLST_0001_0001" in out
    # the maps load as nlst labels
    ds = D.get_dataset("nlst", str(tmp_path), label_dir=str(tmp_path / "labels"), split_scheme="ordered", ndim=3)
    assert set(np.unique(ds.load_pair("NLST_0001").fixed_seg)) == {0, 1, 2, 3}
    # --lung-masks: the dataset's own lung masks for class 1 (the paper text)
    lung = np.zeros(shape, np.uint8)
    lung[1:2] = 1
    for case in ("NLST_0001_0000", "NLST_0001_0001"):
        save(tmp_path / "masksTr" / f"{case}.nii.gz", lung, aff)
    main(["make-labels", "--ts-dir", str(ts), "--out", str(tmp_path / "labels_m"), "--lung-masks",
          str(tmp_path / "masksTr")])
    lab_m = np.asarray(nib.load(str(tmp_path / "labels_m" / "NLST_0001_0000.nii.gz")).dataobj)
    np.testing.assert_array_equal(lab_m == 1, lung == 1)
    np.testing.assert_array_equal(lab_m[4:], expected[4:])
    # masks of one case on different grids are refused
    save(ts / "NLST_0001_0000" / "liver.nii.gz", np.ones(shape, np.uint8), affine((1.5, 1.5, 1.5), (0, 0, 0)))
    with pytest.raises(ValueError, match="liver.nii.gz is not on the grid"):
        main(["make-labels", "--ts-dir", str(ts), "--out", str(tmp_path / "labels2")])


def test_describe_ids_and_missing():
    assert S.describe_ids(["NLST_0001", "NLST_0002", "NLST_0003", "NLST_0007"]) == "NLST_0001..0003, NLST_0007"
    lines = S.describe_missing([f"/d/imagesTr/NLST_{n:04d}_0000.nii.gz" for n in range(1, 31)])
    assert lines == [f"/d/imagesTr{os.sep}: NLST_0001..0030 (_0000.nii.gz)"]
