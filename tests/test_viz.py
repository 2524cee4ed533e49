import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from captum_gradmask import viz  # noqa: E402


def test_plane_of_images_and_volumes():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    np.testing.assert_allclose(viz.plane(image), image.mean(0).numpy())
    volume = torch.rand(1, 5, 6, 7)
    np.testing.assert_allclose(viz.plane(volume), volume[0, :, :, 3].numpy())
    np.testing.assert_allclose(viz.plane(volume, slice_index=1), volume[0, :, :, 1].numpy())
    with pytest.raises(ValueError, match=r"expected an image \(C, H, W\) or a volume \(C, D, H, W\), got shape \(4, 4\)"):
        viz.plane(torch.zeros(4, 4))


def test_shared_scale():
    maps = [torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 2.0])]
    assert viz.shared_scale(maps, signed=True) == (-3.0, 3.0)
    assert viz.shared_scale(maps, signed=False) == (-3.0, 3.0)
    assert viz.shared_scale([torch.tensor([0.5, 2.0])], signed=False) == (0.5, 2.0)
    assert viz.shared_scale([torch.zeros(3)], signed=True) == (-1.0, 1.0)


@pytest.mark.parametrize("spatial", [(8, 8), (6, 8, 8)])
def test_map_grid_rows_scales_and_contours(spatial):
    images = torch.rand(3, 1, *spatial)
    masks = torch.zeros(3, 2, *spatial, dtype=torch.bool)
    masks[:, 0, 2:4, 2:4] = True
    maps = {"a": torch.randn(3, 1, *spatial), "b": torch.randn(3, 1, *spatial)}
    figure = viz.map_grid(images, maps, masks, n_columns=2, signed=True)
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    assert len(panels) == 6 and len(figure.axes) - len(panels) == 2  # one colour bar per map row
    map_artist = panels[2].images[-1]
    low, high = map_artist.get_clim()
    assert low == -high and high == pytest.approx(float(maps["a"][:2].abs().max()))
    assert all(len(axis.collections) > 0 for axis in panels)  # the mask contour everywhere


def test_nan_is_transparent_and_left_out_of_the_scale():
    order = torch.tensor([[[float("nan"), 1.0], [2.0, float("nan")]]])
    assert viz.shared_scale([order], signed=False) == (1.0, 2.0)
    figure, axis = plt.subplots()
    artist = viz.show(axis, torch.rand(1, 2, 2), overlay=order, scale=(0.5, 2.5), cmap="viridis")
    assert artist.get_cmap().name == "viridis"
    assert np.ma.getmaskarray(artist.get_array()).sum() == 2  # matplotlib masks NaN: transparent


def test_montage_cuts_the_volume_at_each_slice():
    volume = torch.rand(1, 6, 7, 9)
    lesion = torch.zeros(1, 6, 7, 9, dtype=torch.bool)
    lesion[0, 2:4, 2:5, 3:6] = True
    saliency = torch.rand(1, 6, 7, 9)
    figure = viz.montage(volume, {"|saliency|": saliency}, masks=lesion, slice_indices=[3, 5])
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    assert [axis.get_title(loc="left") for axis in panels[:2]] == ["slice 3", "slice 5"]
    np.testing.assert_allclose(panels[3].images[-1].get_array(), saliency[0, :, :, 5].numpy())
    low, high = panels[2].images[-1].get_clim()
    assert high == pytest.approx(float(saliency[..., [3, 5]].max()))
    assert all(len(axis.collections) > 0 for axis in panels)
    default = viz.montage(volume, {}, n_slices=3)
    assert [axis.get_title(loc="left") for axis in default.axes] == ["slice 2", "slice 4", "slice 6"]


def test_montage_errors():
    with pytest.raises(ValueError, match=r"volume: expected \(C, D, H, W\), got shape \(6, 7, 9\)"):
        viz.montage(torch.rand(6, 7, 9), {})
    with pytest.raises(ValueError, match=r"slice_indices: expected indices in \[0, 9\), got \[9\]"):
        viz.montage(torch.rand(1, 6, 7, 9), {}, slice_indices=[9])
