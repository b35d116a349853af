"""Tests of datasets.py on tiny fake data trees in the real public layouts."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets as D  # noqa: E402

nib = pytest.importorskip("nibabel")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def save_nii(path, arr, affine):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))


def affine_of(zooms, origin=(12.0, -30.0, 40.5), flip_x=True):
    aff = np.diag([(-1.0 if flip_x else 1.0) * zooms[0], zooms[1], zooms[2], 1.0])
    aff[:3, 3] = origin
    return aff


def world(aff, ijk):
    ijk = np.atleast_2d(np.asarray(ijk, float))
    return (np.c_[ijk, np.ones(len(ijk))] @ np.asarray(aff).T)[:, :3]


def blob_labels(shape, rng):
    """Label map with lung (1), bone (2), liver (3) boxes."""
    lab = np.zeros(shape, np.uint8)
    X, Y, Z = shape
    lab[2:X // 2, 2:Y - 2, 2:Z // 2] = 1
    lab[X // 2 + 1:X - 2, 3:Y // 2, 3:Z - 3] = 2
    lab[X // 2 + 1:X - 2, Y // 2 + 1:Y - 2, Z // 2:Z - 2] = 3
    return lab


MARKER_HU = 3000.0
BACKGROUND_HU = -500.0


def make_l2r_tree(root, prefix, n, shape, zooms, n_kp=5, seed=0, kp_margin=(3, 3, 3)):
    """Fake Learn2Reg tree: imagesTr, masksTr, keypointsTr (+ a separate label folder).
    Each keypoint sits on a bright marker voxel of its image. Returns (data_dir, label_dir,
    info dict)."""
    rng = np.random.default_rng(seed)
    data, labels = root / prefix, root / f"{prefix}_labels"
    info = {}
    for case in range(1, n + 1):
        for suffix in ("0000", "0001"):
            stem = f"{prefix}_{case:04d}_{suffix}"
            aff = affine_of(zooms, origin=(10.0 * case, -20.0, 5.0))
            img = np.full(shape, BACKGROUND_HU, np.float32)
            img += rng.uniform(-50, 50, size=shape).astype(np.float32)
            img[0, 0, 0] = -2000.0  # below the window
            img[1, 0, 0] = 269.0  # inside both windows
            kp = np.stack([rng.integers(m, s - m, size=n_kp) for s, m in zip(shape, kp_margin)],
                          axis=1).astype(float)
            for p in kp.astype(int):
                img[tuple(p)] = MARKER_HU
            save_nii(data / "imagesTr" / f"{stem}.nii.gz", img.astype(np.int16), aff)
            save_nii(data / "masksTr" / f"{stem}.nii.gz", (img > 0).astype(np.uint8), aff)
            save_nii(labels / f"{stem}.nii.gz", blob_labels(shape, rng), aff)
            os.makedirs(data / "keypointsTr", exist_ok=True)
            np.savetxt(data / "keypointsTr" / f"{stem}.csv", kp, delimiter=",", fmt="%.1f")
            info[stem] = {"kp": kp, "affine": aff, "img": img.astype(np.int16)}
    return data, labels, info


def make_acdc_tree(root, n=3, shape=(40, 48, 6), zooms=(1.5, 1.25, 10.0)):
    """Fake ACDC tree; ED (frame 01) has a large LV blob, ES (frame 12) a small one; a decoy
    frame 05 would give label 1 only. Labels sit on the middle slice."""
    data = root / "acdc"
    for p in range(1, n + 1):
        pid = f"patient{p:03d}"
        folder = data / pid
        os.makedirs(folder, exist_ok=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\nHeight: 180.0\n"
                                         "NbFrame: 30\nWeight: 80.0\n")
        aff = affine_of(zooms, origin=(5.0 * p, 7.0, -3.0))
        zc = shape[2] // 2
        cx, cy = 14 + p, 30
        xx, yy = np.meshgrid(np.arange(shape[0]) * zooms[0], np.arange(shape[1]) * zooms[1],
                             indexing="ij")
        for frame, r_lv in ((1, 9.0), (12, 5.0), (5, 0.0)):
            lab = np.zeros(shape, np.uint8)
            dist = np.hypot(xx - cx * zooms[0], yy - cy * zooms[1])
            sl = np.zeros(shape[:2], np.uint8)
            if r_lv > 0:
                sl[dist < r_lv + 6] = 2  # myocardium ring
                sl[dist < r_lv] = 3
                sl[(dist >= r_lv + 6) & (dist < r_lv + 12) & (xx < cx * zooms[0])] = 1
            else:
                sl[dist < 5] = 1
            lab[:, :, zc] = sl
            rng = np.random.default_rng(frame + 10 * p)
            img = rng.uniform(0, 50, size=shape).astype(np.float32)
            img[lab == 3] += 400 if frame == 1 else 250
            img[lab == 2] += 150
            img[0, 0, 0] = 5000.0  # outlier above the 99.5th percentile
            stem = f"{pid}_frame{frame:02d}"
            save_nii(folder / f"{stem}.nii.gz", img.astype(np.int16), aff)
            save_nii(folder / f"{stem}_gt.nii.gz", lab, aff)
    return data


def make_folder_tree(root, n=4, shape=(18, 16, 14), zooms=(0.8, 0.9, 1.1), split=None,
                     with_kp=True, max_label=4):
    """Fake folder dataset + pairs CSV; keypoints on marker voxels."""
    rng = np.random.default_rng(3)
    data = root / "folder"
    os.makedirs(data / "img", exist_ok=True)
    lines = ["pair_id,fixed,moving,fixed_seg,moving_seg" + (",fixed_kp,moving_kp" if with_kp
                                                             else "")
             + (",split" if split else "")]
    info = {}
    for i in range(n):
        row = [f"case{i}"]
        files = {}
        for role in ("fixed", "moving"):
            aff = affine_of(zooms)
            img = rng.uniform(10, 20, size=shape).astype(np.float32)
            kp = np.stack([rng.integers(2, s - 2, size=4) if s > 1 else np.zeros(4, int)
                           for s in shape], axis=1).astype(float)
            for p in kp.astype(int):
                img[tuple(p)] = 100.0
            lab = np.zeros(shape, np.uint8)
            lab.flat[: lab.size // 2] = rng.integers(0, max_label + 1, size=lab.size // 2)
            save_nii(data / "img" / f"{role}{i}.nii.gz", img, aff)
            save_nii(data / "img" / f"{role}{i}_seg.nii.gz", lab, aff)
            np.savetxt(data / "img" / f"{role}{i}_kp.csv", kp, delimiter=",", fmt="%.1f",
                       header="x,y,z", comments="")
            files[role] = (f"img/{role}{i}.nii.gz", f"img/{role}{i}_seg.nii.gz",
                           f"img/{role}{i}_kp.csv")
            info[(f"case{i}", role)] = {"kp": kp, "img": img, "affine": aff}
        row += [files["fixed"][0], files["moving"][0], files["fixed"][1], files["moving"][1]]
        if with_kp:
            row += [files["fixed"][2], files["moving"][2]]
        if split:
            row.append(split[i])
        lines.append(",".join(row))
    csv_path = data / "pairs.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path, info


def check_pair_basics(pair, ds):
    s = tuple(ds.image_shape)
    assert pair.fixed.shape == s + (1,) and pair.moving.shape == s + (1,)
    assert pair.fixed.dtype == np.float32 and pair.moving.dtype == np.float32
    assert pair.fixed_seg.shape == s and pair.moving_seg.shape == s
    assert pair.fixed_seg.dtype == np.int32 and pair.moving_seg.dtype == np.int32
    for a in (pair.fixed, pair.moving):
        assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    for seg in (pair.fixed_seg, pair.moving_seg):
        assert set(np.unique(seg)) <= set(range(ds.num_classes + 1))
    assert len(pair.spacing) == ds.ndim


def check_splits(ds, sizes):
    ids = {s: ds.split_ids(s) for s in D.SPLITS if sizes[D.SPLITS.index(s)] > 0}
    assert [len(ids.get(s, [])) for s in D.SPLITS] == list(sizes)
    flat = [i for s in ids.values() for i in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert ids == {s: ds.split_ids(s) for s in ids}  # deterministic
    return ids


# ------------------------------------------------------------------------------------------
# splits helper
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratios,expected", [
    (209, (169, 10, 30), [169, 10, 30]),
    (28, (20, 4, 4), [20, 4, 4]),
    (100, (50, 20, 30), [50, 20, 30]),
    (40, (70, 15, 15), [28, 6, 6]),
    (6, (169, 10, 30), [4, 1, 1]),
    (3, (50, 20, 30), [1, 1, 1]),
    (2, (70, 15, 15), [1, 1, 0]),
])
def test_split_sizes(n, ratios, expected):
    sizes = D.split_sizes(n, ratios)
    assert sizes == expected and sum(sizes) == n


# ------------------------------------------------------------------------------------------
# NLST
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nlst_tree(tmp_path_factory):
    return make_l2r_tree(tmp_path_factory.mktemp("nlst"), "NLST", n=6, shape=(24, 20, 24),
                         zooms=(1.5, 1.5, 1.5))


def test_nlst_3d(nlst_tree):
    data, labels, info = nlst_tree
    ds = D.get_dataset("nlst", str(data), label_dir=str(labels), ndim=3, split_scheme="ordered", body_mask=False)
    assert ds.ndim == 3 and ds.image_shape == (24, 20, 24)
    assert ds.class_names == ("lung", "bone", "liver") and ds.num_classes == 3
    ids = check_splits(ds, (4, 1, 1))
    assert ids["train"] == ["NLST_0001", "NLST_0002", "NLST_0003", "NLST_0004"]
    assert ids["test"] == ["NLST_0006"]
    pair = ds.load_pair("NLST_0002")
    check_pair_basics(pair, ds)
    assert pair.spacing == (1.5, 1.5, 1.5)
    raw_f = info["NLST_0002_0000"]
    np.testing.assert_allclose(pair.affine, raw_f["affine"])
    # HU clipping (-980, 1518) then min-max to [0, 1] (the raw range spans the window)
    assert pair.fixed[0, 0, 0, 0] == 0.0
    np.testing.assert_allclose(pair.fixed[1, 0, 0, 0], (269 + 980) / 2498, atol=1e-6)
    assert pair.fixed.max() == 1.0
    # labels from the label folder
    assert set(np.unique(pair.fixed_seg)) == {0, 1, 2, 3}
    # keypoints land on the marker voxels
    for kp, img in ((pair.fixed_kp, pair.fixed), (pair.moving_kp, pair.moving)):
        assert kp.shape == (5, 3)
        vals = img[tuple(np.round(kp).astype(int).T) + (0,)]
        np.testing.assert_array_equal(vals, 1.0)
    np.testing.assert_allclose(pair.fixed_kp, raw_f["kp"])


def test_nlst_2d_coronal_slice(nlst_tree):
    data, labels, info = nlst_tree
    ds = D.get_dataset("nlst", str(data), label_dir=str(labels), split_scheme="ordered",
                       body_mask=False)  # default 2D, axis 1
    assert ds.ndim == 2 and ds.image_shape == (24, 24)
    pair = ds.load_pair("NLST_0001")
    check_pair_basics(pair, ds)
    assert pair.fixed_kp is None and pair.moving_kp is None
    assert pair.spacing == (1.5, 1.5)
    raw = info["NLST_0001_0000"]["img"].astype(np.float32)
    clipped = np.clip(raw[:, 10, :], -980, 1518)
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())  # min-max of the slice
    np.testing.assert_allclose(pair.fixed[..., 0], expected, atol=1e-6)
    # the 2D affine places voxel (a, b) at raw voxel (a, 10, b)
    aff = info["NLST_0001_0000"]["affine"]
    np.testing.assert_allclose(world(pair.affine, [[3, 7, 0]]), world(aff, [[3, 10, 7]]))
    ds0 = D.get_dataset("nlst", str(data), label_dir=str(labels), slice_axis=0, split_scheme="ordered",
                        body_mask=False)
    assert ds0.image_shape == (20, 24)
    assert ds0.load_pair("NLST_0001").fixed.shape == (20, 24, 1)


def test_nlst_dataset_json(tmp_path):
    data, labels, _ = make_l2r_tree(tmp_path, "NLST", n=3, shape=(8, 8, 8),
                                    zooms=(1.5, 1.5, 1.5), n_kp=2, kp_margin=(1, 1, 1))
    (data / "NLST_dataset.json").write_text(json.dumps({
        "name": "NLST",
        "training_paired_images": [
            {"fixed": "./imagesTr/NLST_0003_0000.nii.gz",
             "moving": "./imagesTr/NLST_0003_0001.nii.gz"},
            {"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
             "moving": "./imagesTr/NLST_0001_0001.nii.gz"}],
        "registration_val": [{"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
                              "moving": "./imagesTr/NLST_0001_0001.nii.gz"}]}))
    ds = D.get_dataset("nlst", str(data), label_dir=str(labels), split_scheme="ordered")
    assert ds.all_ids() == ["NLST_0001", "NLST_0003"]
    assert ds.split_ids("train") == ["NLST_0001"] and ds.split_ids("val") == ["NLST_0003"]
    with pytest.raises(ValueError, match="'test'.*empty"):
        ds.split_ids("test")
    # a listed but missing image is named
    os.remove(data / "imagesTr" / "NLST_0003_0001.nii.gz")
    with pytest.raises(FileNotFoundError, match="NLST_0003_0001"):
        D.get_dataset("nlst", str(data), label_dir=str(labels), split_scheme="ordered")


def test_nlst_bad_inputs(tmp_path):
    data, labels, _ = make_l2r_tree(tmp_path, "NLST", n=2, shape=(8, 8, 8),
                                    zooms=(1.5, 1.5, 1.5), n_kp=2, kp_margin=(1, 1, 1))
    with pytest.raises(ValueError, match="label-dir"):
        D.get_dataset("nlst", str(data))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.get_dataset("nlst", str(tmp_path / "nowhere"), label_dir=str(labels))
    with pytest.raises(FileNotFoundError, match="nolabels"):
        D.get_dataset("nlst", str(data), label_dir=str(tmp_path / "nolabels"))
    ds = D.get_dataset("nlst", str(data), label_dir=str(labels), ndim=3, split_scheme="ordered",
                      body_mask=False)
    with pytest.raises(KeyError, match="NLST_0099"):
        ds.load_pair("NLST_0099")
    with pytest.raises(ValueError, match="NLST_0099"):
        ds.load_pair("NLST_0099")
    aff = affine_of((1.5, 1.5, 1.5), origin=(10.0, -20.0, 5.0))  # case 1's grid
    # NaN in an image
    img_path = data / "imagesTr" / "NLST_0001_0000.nii.gz"
    good = nib.load(str(img_path)).get_fdata().astype(np.float32)
    bad = good.copy()
    bad[2, 2, 2] = np.nan
    save_nii(img_path, bad, aff)
    with pytest.raises(ValueError, match="NLST_0001_0000.nii.gz.*NaN"):
        ds.load_pair("NLST_0001")
    # unreadable NIfTI
    img_path.write_bytes(b"this is not a nifti file")
    with pytest.raises(ValueError, match="NLST_0001_0000.nii.gz"):
        ds.load_pair("NLST_0001")
    save_nii(img_path, good, aff)
    ds.load_pair("NLST_0001")
    # labels outside 0..3
    lab_path = labels / "NLST_0001_0001.nii.gz"
    lab = np.asarray(nib.load(str(lab_path)).dataobj)
    bad_lab = lab.copy()
    bad_lab[0, 0, 0] = 5
    save_nii(lab_path, bad_lab, aff)
    with pytest.raises(ValueError, match="NLST_0001_0001.nii.gz.*outside 0..3"):
        ds.load_pair("NLST_0001")
    # image-vs-label shape mismatch
    save_nii(lab_path, lab[:-1], aff)
    with pytest.raises(ValueError, match="shape mismatch"):
        ds.load_pair("NLST_0001")
    save_nii(lab_path, lab, aff)
    # missing keypoint file: the pair loads without keypoints (every metric but TRE)
    os.remove(data / "keypointsTr" / "NLST_0001_0001.csv")
    assert ds.load_pair("NLST_0001").fixed_kp is None and ds.load_pair("NLST_0002").fixed_kp is not None
    # missing label map (checked at construction)
    os.remove(lab_path)
    with pytest.raises(FileNotFoundError, match="NLST_0001_0001"):
        D.get_dataset("nlst", str(data), label_dir=str(labels), split_scheme="ordered")
    # missing moving partner during discovery: both missing files in one message
    os.remove(data / "imagesTr" / "NLST_0002_0001.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"2 file\(s\) not found") as err:
        D.get_dataset("nlst", str(data), label_dir=str(labels), split_scheme="ordered")
    assert "labels/NLST_0001_0001.nii.gz" in str(err.value) and "imagesTr/NLST_0002_0001.nii.gz" in str(err.value)


# ------------------------------------------------------------------------------------------
# L2R LungCT
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def l2r_tree(tmp_path_factory):
    # axis 1 (130) is longer than 128 -> centre crop by 1 voxel; keypoints kept away from it
    return make_l2r_tree(tmp_path_factory.mktemp("l2r"), "LungCT", n=4, shape=(20, 130, 24),
                         zooms=(1.75, 1.25, 1.75), n_kp=6, kp_margin=(2, 4, 2))


def test_l2r_lung_3d_resampling_padding_and_keypoints(l2r_tree):
    data, labels, info = l2r_tree
    ds = D.get_dataset("l2r-lung", str(data), label_dir=str(labels), split_scheme="ordered")
    assert ds.ndim == 3 and ds.image_shape == (192, 128, 192)
    check_splits(ds, (2, 1, 1))
    pair = ds.load_pair("LungCT_0003")
    check_pair_basics(pair, ds)
    assert pair.spacing == (2.0, 2.0, 2.0)
    # 2 mm grid: 20 x 130 x 24 at 1.75/1.25/1.75 -> 18 x 81 x 21, padded to 192 x 128 x 192
    # (before: 87, 24, 86 voxels, torchio's ceil(d/2)); raw = (new - start + 1/2) z-ratio ... inverted:
    zooms, starts = np.array([1.75, 1.25, 1.75]), np.array([-87, -24, -86])
    raw = info["LungCT_0003_0000"]
    expected = (raw["kp"] + 0.5) * zooms / 2.0 - 0.5 - starts
    np.testing.assert_allclose(pair.fixed_kp, expected, atol=1e-4)
    assert pair.extras["keypoints_dropped"] == 0 and pair.extras["keypoints_total"] == 6
    # the affine maps preprocessed keypoints to the same world points as the raw ones
    np.testing.assert_allclose(world(pair.affine, pair.fixed_kp), world(raw["affine"], raw["kp"]), atol=1e-4)
    # padding is 0 and the data block starts at the pad offsets
    assert pair.fixed[0, 0, 0, 0] == 0.0 and pair.fixed_seg[0, 0, 0] == 0
    block = pair.fixed[87:87 + 18, 24:24 + 81, 86:86 + 21]
    assert (block > 0).mean() > 0.99 and pair.fixed[86, 24:105, 86:107].max() == 0.0


def test_l2r_lung_2d(l2r_tree):
    data, labels, info = l2r_tree
    ds = D.get_dataset("l2r-lung", str(data), label_dir=str(labels), ndim=2, split_scheme="ordered")
    pair = ds.load_pair("LungCT_0001")
    assert ds.image_shape == (192, 192)
    check_pair_basics(pair, ds)
    assert pair.fixed_kp is None and pair.spacing == (2.0, 2.0)
    # the 2D affine places voxel (a, b) at 3D voxel (a, 64, b) of the padded 3D grid
    pair3 = D.get_dataset("l2r-lung", str(data), label_dir=str(labels), split_scheme="ordered").load_pair("LungCT_0001")
    np.testing.assert_allclose(pair.fixed[..., 0], pair3.fixed[:, 64, :, 0])
    np.testing.assert_allclose(world(pair.affine, [[90, 95, 0]]), world(pair3.affine, [[90, 64, 95]]))


# ------------------------------------------------------------------------------------------
# ACDC
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acdc_dir(tmp_path_factory):
    return make_acdc_tree(tmp_path_factory.mktemp("acdc"))


def test_acdc(acdc_dir):
    ds = D.get_dataset("acdc", str(acdc_dir), split_scheme="ordered")
    assert ds.ndim == 2 and ds.image_shape == (128, 128) and ds.num_classes == 3
    ids = check_splits(ds, (1, 1, 1))
    assert ids == {"train": ["patient001"], "val": ["patient002"], "test": ["patient003"]}
    pair = ds.load_pair("patient002")
    check_pair_basics(pair, ds)
    assert pair.spacing == (1.8, 1.8)  # 3D resampling to 1.8 mm (authors' code)
    assert pair.fixed_kp is None
    assert pair.extras["frames"] == {"ED": 1, "ES": 12}
    # ED is fixed (large LV), ES moving (small LV); the decoy frame 05 has label 1 only
    assert set(np.unique(pair.fixed_seg)) == {0, 1, 2, 3}
    assert set(np.unique(pair.moving_seg)) == {0, 1, 2, 3}
    assert (pair.fixed_seg == 3).sum() > 2 * (pair.moving_seg == 3).sum()
    # LV area is preserved by the isotropic resampling (pi 9^2 mm^2)
    area = (pair.fixed_seg == 3).sum() * 1.8 ** 2
    assert abs(area - np.pi * 81) < 0.15 * np.pi * 81
    # intensities: min-max of the slice (the outlier voxel lies on another slice)
    assert pair.fixed.max() == 1.0 and pair.fixed.min() == 0.0 and pair.fixed[pair.fixed_seg == 3].mean() > 0.5
    # crop centred on the bounding box of the fixed labels
    where = np.argwhere(pair.fixed_seg > 0)
    assert np.all((where.min(axis=0) + where.max(axis=0) + 1) // 2 == 64)
    # affine: the LV centre is at the same world position before and after preprocessing
    raw = nib.load(str(acdc_dir / "patient002" / "patient002_frame01_gt.nii.gz"))
    raw_lab = np.asarray(raw.dataobj)
    raw_c = np.argwhere(raw_lab == 3).mean(axis=0)
    new_c = np.argwhere(pair.fixed_seg == 3).mean(axis=0)
    np.testing.assert_allclose(world(pair.affine, [[*new_c, 0]]), world(raw.affine, [raw_c]),
                               atol=1.0)


def test_acdc_options_and_errors(tmp_path):
    data = make_acdc_tree(tmp_path, n=2, shape=(20, 24, 3))
    ds = D.get_dataset("acdc", str(data), target_spacing=2.0, split_scheme="ordered")
    pair = ds.load_pair("patient001")
    assert pair.spacing == (2.0, 2.0) and pair.fixed.shape == (128, 128, 1)
    with pytest.raises(ValueError, match="2D only"):
        D.get_dataset("acdc", str(data), ndim=3)
    # a 'training' sub-folder is found
    parent = tmp_path / "release"
    os.makedirs(parent)
    os.rename(data, parent / "training")
    ds = D.get_dataset("acdc", str(parent), split_scheme="ordered")
    assert ds.all_ids() == ["patient001", "patient002"]
    root = parent / "training"
    os.remove(root / "patient002" / "patient002_frame12.nii.gz")
    with pytest.raises(FileNotFoundError, match="patient002_frame12.nii.gz"):
        ds.load_pair("patient002")
    (root / "patient001" / "Info.cfg").write_text("ED: 1\n")
    with pytest.raises(ValueError, match="Info.cfg.*ES"):
        D.get_dataset("acdc", str(root), split_scheme="ordered")
    os.remove(root / "patient001" / "Info.cfg")
    with pytest.raises(FileNotFoundError, match="Info.cfg"):
        D.get_dataset("acdc", str(root), split_scheme="ordered")


# ------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------
def test_folder_3d(tmp_path):
    csv_path, info = make_folder_tree(tmp_path, n=4)
    ds = D.get_dataset("folder", None, pairs_csv=str(csv_path))
    assert ds.ndim == 3 and ds.image_shape == (18, 16, 14) and ds.num_classes == 4
    ids = check_splits(ds, (2, 1, 1))
    assert ids["train"] == ["case0", "case1"]
    pair = ds.load_pair("case1")
    check_pair_basics(pair, ds)
    np.testing.assert_allclose(pair.spacing, (0.8, 0.9, 1.1), rtol=1e-6)
    assert pair.fixed.min() == 0.0 and pair.fixed.max() == 1.0
    for role, kp, img in (("fixed", pair.fixed_kp, pair.fixed),
                          ("moving", pair.moving_kp, pair.moving)):
        np.testing.assert_allclose(kp, info[("case1", role)]["kp"])
        np.testing.assert_array_equal(img[tuple(np.round(kp).astype(int).T) + (0,)], 1.0)
    ds5 = D.get_dataset("folder", None, pairs_csv=str(csv_path), num_classes=5,
                        clip_percentiles=[1, 99])
    assert ds5.num_classes == 5
    assert ds5.load_pair("case0").fixed.max() == 1.0


def test_folder_2d_singleton_and_split_column(tmp_path):
    csv_path, info = make_folder_tree(tmp_path, n=3, shape=(20, 1, 16), zooms=(0.7, 3.0, 0.6),
                                      split=["train", "test", "train"])
    ds = D.get_dataset("folder", None, pairs_csv=str(csv_path))
    assert ds.ndim == 2 and ds.image_shape == (20, 16)
    assert ds.split_ids("train") == ["case0", "case2"] and ds.split_ids("test") == ["case1"]
    with pytest.raises(ValueError, match="'val'.*empty"):
        ds.split_ids("val")
    pair = ds.load_pair("case2")
    check_pair_basics(pair, ds)
    np.testing.assert_allclose(pair.spacing, (0.7, 0.6), rtol=1e-6)
    assert pair.fixed_kp.shape == (4, 2)
    np.testing.assert_array_equal(pair.fixed[tuple(np.round(pair.fixed_kp).astype(int).T)
                                             + (0,)], 1.0)
    kp3 = info[("case2", "fixed")]["kp"]
    np.testing.assert_allclose(world(pair.affine, np.c_[pair.fixed_kp, np.zeros(4)]),
                               world(info[("case2", "fixed")]["affine"], kp3), atol=1e-4)


def test_folder_slice_of_3d_and_errors(tmp_path):
    csv_path, _ = make_folder_tree(tmp_path, n=2)
    with pytest.warns(UserWarning, match="dropped"):
        ds = D.get_dataset("folder", None, pairs_csv=str(csv_path), ndim=2)
        pair = ds.load_pair("case0")
    assert ds.image_shape == (18, 16) and pair.fixed_kp is None
    # unknown pair id
    with pytest.raises(KeyError, match="nope"):
        ds.load_pair("nope")
    # missing column
    bad = tmp_path / "bad.csv"
    bad.write_text("pair_id,fixed,moving\nx,a.nii.gz,b.nii.gz\n")
    with pytest.raises(ValueError, match="fixed_seg"):
        D.get_dataset("folder", None, pairs_csv=str(bad))
    # missing image
    bad.write_text("pair_id,fixed,moving,fixed_seg,moving_seg\n"
                   "x,folder/img/fixed0.nii.gz,folder/img/missing.nii.gz,"
                   "folder/img/fixed0_seg.nii.gz,folder/img/moving0_seg.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        D.get_dataset("folder", None, pairs_csv=str(bad))
    # bad split value
    bad.write_text("pair_id,fixed,moving,fixed_seg,moving_seg,split\n"
                   "x,folder/img/fixed0.nii.gz,folder/img/moving0.nii.gz,"
                   "folder/img/fixed0_seg.nii.gz,folder/img/moving0_seg.nii.gz,training\n")
    with pytest.raises(ValueError, match="training"):
        D.get_dataset("folder", None, pairs_csv=str(bad))
    # moving label above the number of classes
    ds3 = D.get_dataset("folder", None, pairs_csv=str(csv_path), num_classes=3)
    with pytest.raises(ValueError, match="outside 0..3"):
        ds3.load_pair("case0")
    with pytest.raises(FileNotFoundError, match="no_such.csv"):
        D.get_dataset("folder", None, pairs_csv=str(tmp_path / "no_such.csv"))
    with pytest.raises(ValueError, match="pairs-csv"):
        D.get_dataset("folder", None)


# ------------------------------------------------------------------------------------------
# synthetic (fake generator for the caching logic, the real one if present)
# ------------------------------------------------------------------------------------------
def fake_synthetic_module(calls):
    def generate_pair(seed, shape, max_disp=None):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        nd = len(shape)
        return {
            "fixed": rng.random(shape).astype(np.float32),
            "moving": rng.random(shape).astype(np.float32),
            "fixed_seg": rng.integers(0, 4, size=shape).astype(np.int32),
            "moving_seg": rng.integers(0, 4, size=shape).astype(np.int32),
            "disp": rng.normal(size=tuple(shape) + (nd,)).astype(np.float32),
            "lame": {"lung": (0.1, float(rng.random())), "bone": (0.9, 0.8),
                     "liver": (np.float32(0.5), 0.4)},
            "fixed_kp": rng.random((5, nd)) * 10,
            "moving_kp": rng.random((5, nd)) * 10,
        }

    mod = types.SimpleNamespace(CLASS_NAMES=("lung", "bone", "liver"),
                                generate_pair=generate_pair, GENERATOR_VERSION="test1")
    return mod


@pytest.fixture
def fake_synth(monkeypatch):
    calls = []
    mod = fake_synthetic_module(calls)
    monkeypatch.setattr(D.synthetic, "_synthetic_module", lambda: mod)
    return mod, calls


def assert_same_pair(a, b):
    for key in ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_kp", "moving_kp"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_array_equal(a.extras["disp_true"], b.extras["disp_true"])
    assert a.extras["lame"] == b.extras["lame"]


def test_synthetic_cache_and_determinism(tmp_path, fake_synth):
    mod, calls = fake_synth
    ds = D.get_dataset("synthetic", None, cache_dir=str(tmp_path / "c1"), image_size=[16, 12],
                       num_pairs=10, data_seed=2)
    assert ds.ndim == 2 and ds.image_shape == (16, 12) and ds.num_classes == 3
    ids = check_splits(ds, (7, 2, 1))
    old_umask = os.umask(0o022)
    try:
        pair = ds.load_pair(ids["val"][0])
    finally:
        os.umask(old_umask)
    # a shared cache: the file gets a plain file's permissions (not a temp file's 0600)
    assert os.stat(ds.cache_path(ids["val"][0])).st_mode & 0o777 == 0o644
    check_pair_basics(pair, ds)
    assert pair.extras["seed"] == 2 * 100003 + 7
    assert pair.extras["disp_true"].shape == (16, 12, 2)
    assert pair.extras["lame"]["lung"][0] == 0.1 and pair.spacing == (1.0, 1.0)
    assert calls == [2 * 100003 + 7]
    files = os.listdir(tmp_path / "c1")
    assert files == [f"synthetic_vtest1_16x12_m0.05_seed{2 * 100003 + 7}.npz"]  # no temp leftovers
    # second load reads the cache
    def boom(seed, shape):
        raise AssertionError("generator must not run")
    mod.generate_pair, real = boom, mod.generate_pair
    ds2 = D.get_dataset("synthetic", None, cache_dir=str(tmp_path / "c1"), image_size=[16, 12],
                        num_pairs=10, data_seed=2)
    assert_same_pair(ds2.load_pair(ids["val"][0]), pair)
    # corrupted cache -> warning and regeneration
    mod.generate_pair = real
    path = ds.cache_path(ids["val"][0])
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.warns(UserWarning, match="regenerating"):
        again = ds2.load_pair(ids["val"][0])
    assert_same_pair(again, pair)
    np.load(path)["fixed"]  # rewritten, readable
    # other cache folder: same data (deterministic); other base seed: different data
    ds3 = D.get_dataset("synthetic", None, cache_dir=str(tmp_path / "c2"), image_size=[16, 12],
                        num_pairs=10, data_seed=2)
    assert_same_pair(ds3.load_pair(ids["val"][0]), pair)
    ds4 = D.get_dataset("synthetic", None, cache_dir=str(tmp_path / "c3"), image_size=[16, 12],
                        num_pairs=10, data_seed=3)
    assert not np.array_equal(ds4.load_pair(ids["val"][0]).fixed, pair.fixed)
    arr = ds.arrays("train")
    assert arr["moving"].shape == (7, 16, 12, 1) and arr["fixed_seg"].shape == (7, 16, 12)
    assert arr["fixed_seg"].dtype == np.int32 and ds.arrays("train") is arr


def test_synthetic_3d_and_data_dir_cache(tmp_path, fake_synth):
    ds = D.get_dataset("synthetic", str(tmp_path / "d"), ndim=3, image_size=[6])
    assert ds.image_shape == (6, 6, 6) and ds.cache_dir == str(tmp_path / "d")
    assert len(ds.all_ids()) == 40
    pair = ds.load_pair("synthetic_0000")
    assert pair.fixed.shape == (6, 6, 6, 1) and pair.fixed_kp.shape == (5, 3)
    assert len(os.listdir(tmp_path / "d")) == 1
    with pytest.raises(ValueError, match="image_size"):
        D.get_dataset("synthetic", None, ndim=3, image_size=[6, 6])


real_synth = importlib.util.find_spec("datasets.phantoms") is not None


@pytest.mark.skipif(not real_synth, reason="datasets.phantoms not present")
def test_synthetic_real_generator(tmp_path, monkeypatch):
    from datasets import phantoms as synthetic

    ds = D.get_dataset("synthetic", None, cache_dir=str(tmp_path), image_size=[32, 32],
                       num_pairs=3)
    assert ds.class_names == tuple(synthetic.CLASS_NAMES)
    pair = ds.load_pair("synthetic_0001")
    check_pair_basics(pair, ds)
    assert pair.extras["disp_true"].shape == (32, 32, 2)
    lame = pair.extras["lame"]
    assert isinstance(lame, dict) and len(lame) >= 3
    assert all(len(v) == 2 for v in lame.values())
    assert pair.fixed_kp.shape[1] == 2 and pair.fixed_kp.shape == pair.moving_kp.shape
    monkeypatch.setattr(synthetic, "generate_pair",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("no cache")))
    again = D.get_dataset("synthetic", None, cache_dir=str(tmp_path), image_size=[32, 32],
                          num_pairs=3).load_pair("synthetic_0001")
    assert_same_pair(again, pair)


# ------------------------------------------------------------------------------------------
# factory, CLI
# ------------------------------------------------------------------------------------------
def test_unknown_dataset_and_option():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        D.get_dataset("mnist", None)
    with pytest.raises(ValueError, match="pairs_csv"):
        D.get_dataset("synthetic", None, pairs_csv="x.csv")


def test_cli_round_trip(tmp_path, nlst_tree, fake_synth, monkeypatch):
    parser = argparse.ArgumentParser()
    D.add_dataset_args(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    args = parser.parse_args([])
    assert args.dataset == "synthetic"
    monkeypatch.chdir(tmp_path)
    opts = D.dataset_options(args)
    json.dumps(opts)
    assert opts["cache_dir"] == str(tmp_path / ".cache" / "synthetic")
    assert opts["image_size"] == [64, 64] and opts["num_pairs"] == 40
    ds = D.get_dataset(**json.loads(json.dumps(opts)))
    assert isinstance(ds, D.SyntheticDataset) and ds.image_shape == (64, 64)
    data, labels, _ = nlst_tree
    args = parser.parse_args(["--dataset", "nlst", "--data-dir", os.path.relpath(data),
                              "--label-dir", str(labels), "--ndim", "3", "--split-scheme", "ordered"])
    opts = json.loads(json.dumps(D.dataset_options(args)))
    assert os.path.isabs(opts["data_dir"])
    ds = D.dataset_from_args(args)
    ds2 = D.get_dataset(**opts)
    assert ds.ndim == ds2.ndim == 3 and ds.split_ids("test") == ds2.split_ids("test")


def test_import_is_light():
    import subprocess

    code = ("import sys, datasets; "
            "assert 'tensorflow' not in sys.modules and 'nibabel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(D.__file__))))


# ------------------------------------------------------------------------------------------
# tf.data
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="tensorflow not installed")
def test_make_tf_dataset(tmp_path, fake_synth):
    ds = D.get_dataset("synthetic", None, cache_dir=str(tmp_path), image_size=[8, 10],
                       num_pairs=10)
    tfds = D.make_tf_dataset(ds, "train", batch_size=3, seed=5)
    first = next(iter(tfds))
    assert set(first) == {"moving", "fixed", "fixed_seg"}
    assert tuple(first["moving"].shape) == (3, 8, 10, 1)
    assert tuple(first["fixed_seg"].shape) == (3, 8, 10)
    assert first["fixed"].dtype.name == "float32" and first["fixed_seg"].dtype.name == "int32"
    again = next(iter(D.make_tf_dataset(ds, "train", batch_size=3, seed=5)))
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())
    arr = ds.arrays("train")
    rows = [int(np.flatnonzero((arr["fixed"] == f).all(axis=(1, 2, 3)))[0])
            for f in first["fixed"].numpy()]
    np.testing.assert_array_equal(first["moving"].numpy(), arr["moving"][rows])
    one_pass = list(D.make_tf_dataset(ds, "train", batch_size=3, seed=0, shuffle=False,
                                      repeat=False))
    assert [len(b["fixed"]) for b in one_pass] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["fixed"].numpy() for b in one_pass]),
                                  arr["fixed"])


def test_folder_keypoint_count_mismatch_and_pair_selection(tmp_path):
    csv_path, info = make_folder_tree(tmp_path, n=4)
    kp_file = csv_path.parent / "img" / "moving2_kp.csv"
    kp = info[("case2", "moving")]["kp"][:3]  # one keypoint fewer than the fixed file
    np.savetxt(kp_file, kp, delimiter=",", fmt="%.1f", header="x,y,z", comments="")
    ds = D.get_dataset("folder", None, pairs_csv=str(csv_path))
    with pytest.raises(ValueError, match=r"case2: 4 fixed keypoints but 3 moving keypoints .*moving2\.nii\.gz"):
        ds.load_pair("case2")
    assert ds.select_ids("train") == ["case0", "case1"]
    assert ds.select_ids("train", ["case1"]) == ["case1"]
    with pytest.raises(ValueError, match=r"\['case3'\] are not in the train split"):
        ds.select_ids("train", ["case3"])
