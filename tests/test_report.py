"""Grids and index.html from a synthetic run: solid-colour images per job so pixels identify jobs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFont

from batchgen.cells import stack_label
from batchgen.errors import BatchgenError
from batchgen.report import grids as report
from batchgen.report.index import build_index
from batchgen.report.text import wrap_label
from tests.synthetic import CELL, MODELS, STACKS, STYLES, colour, make_run


def job_index(table: pd.DataFrame, **match: object) -> int:
    hits = table.index[(table[list(match)] == pd.Series(match)).all(axis=1)]
    assert len(hits) == 1, match
    return int(hits[0])


def cell_centre(
    grid: Image.Image, col: int, row: int, ncols: int, nrows: int, cell: tuple[int, int] = (CELL, CELL)
) -> tuple[int, int]:
    """Labels sit on the top and left only, so the cells fill the bottom-right corner of the grid."""
    (width, height), (cell_w, cell_h) = grid.size, cell
    return width - (ncols - col) * cell_w + cell_w // 2, height - (nrows - row) * cell_h + cell_h // 2


def grid_for(paths: list[Path], name: str) -> Image.Image:
    (path,) = [p for p in paths if p.name == name]
    with Image.open(path) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------- axes


def test_grid_axes_lists_varying_columns_in_axes_order_then_slots(tmp_path):
    table = make_run(tmp_path, seeds=[1, 2])
    assert report.grid_axes(table, ["style"]) == ["model", "stack", "prompt", "seed", "style"]


def test_grid_axes_treats_int_and_float_forms_as_one_value(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=["none"], styles=["a"])
    table = pd.concat([table, table.assign(seed=1.0, job_id="x")], ignore_index=True)
    assert report.grid_axes(table, ["style"]) == []


def test_unknown_x_axis_raises_with_choices(tmp_path):
    table = make_run(tmp_path)
    expected = (
        "sweep.grid.x: unknown axis 'foo'; choose one of: "
        "model, stack, prompt, seed, steps, guidance_scale, width, height, scheduler, clip_skip, prompt_syntax, "
        "max_sequence_length, epoch, style, weight:grain, weight:ink, blocks:grain, blocks:ink"
    )
    with pytest.raises(BatchgenError, match=f"^{re.escape(expected)}$"):
        report.build_grids(table, tmp_path, "foo", "prompt", ["style"])


def test_unknown_y_axis_raises(tmp_path):
    table = make_run(tmp_path)
    expected = (
        "sweep.grid.y: unknown axis 'style' (did you mean 'steps'?); choose one of: "
        "model, stack, prompt, seed, steps, guidance_scale, width, height, scheduler, clip_skip, prompt_syntax, "
        "max_sequence_length, epoch, weight:grain, weight:ink, blocks:grain, blocks:ink"
    )
    with pytest.raises(BatchgenError, match=f"^{re.escape(expected)}$"):
        report.build_grids(table, tmp_path, "stack", "style", [])


def test_same_x_and_y_raises(tmp_path):
    table = make_run(tmp_path)
    with pytest.raises(BatchgenError, match="x and y are both 'stack'"):
        report.build_grids(table, tmp_path, "stack", "stack", ["style"])


# ---------------------------------------------------------------- grid files


def test_one_grid_per_model_named_after_it(tmp_path):
    table = make_run(tmp_path)
    paths = report.build_grids(table, tmp_path, "stack", "prompt", ["style"])
    assert [p.name for p in paths] == ["tiny_sd1.png", "tiny_sdxl.png"]
    assert all(p.parent == tmp_path / "grids" and p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["tiny_sd1.png", "tiny_sdxl.png"]  # no temp


def test_cells_hold_each_jobs_image_in_first_appearance_order(tmp_path):
    table = make_run(tmp_path)
    paths = report.build_grids(table, tmp_path, "stack", "prompt", ["style"])
    for model in MODELS:
        grid = grid_for(paths, f"{model}.png")
        assert grid.width > 3 * CELL and grid.height > 2 * CELL  # room for labels
        for (col, stack), (row, style) in itertools.product(enumerate(STACKS), enumerate(STYLES)):
            i = job_index(table, model=model, stack=stack, style=style)
            assert grid.getpixel(cell_centre(grid, col, row, 3, 2)) == colour(i), (model, stack, style)


def test_labels_leave_cells_alone_and_draw_text(tmp_path):
    table = make_run(tmp_path)
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "tiny_sd1.png")
    top = grid.height - 2 * CELL
    label_area = grid.crop((0, 0, grid.width, top))
    assert min(level for _, level in label_area.convert("L").getcolors(256)) < 64  # dark text was drawn


def test_skipped_cell_is_grey_placeholder_with_red_mark(tmp_path):
    table = make_run(tmp_path, skip={1})  # tiny_sd1, stack "none", second style
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "tiny_sd1.png")
    centre = cell_centre(grid, 0, 1, 3, 2)
    assert grid.getpixel(centre) == report.PLACEHOLDER_FILL
    assert grid.getpixel(centre) not in {colour(i) for i in range(len(table))}
    x0, y0 = centre[0] - CELL // 2, centre[1] - CELL // 2
    pixels = {rgb for _, rgb in grid.crop((x0, y0, x0 + CELL, y0 + CELL)).getcolors(CELL * CELL)}
    assert report.MARK_FILL in pixels
    # neighbours are untouched images
    assert grid.getpixel(cell_centre(grid, 0, 0, 3, 2)) == colour(0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"status": float("nan"), "image": ""}, "not rendered"),
        ({"status": "failed", "error": "CUDA out of memory"}, "failed: CUDA out of memory"),
        ({"image": "images/gone.png"}, "missing images/gone.png"),
    ],
)
def test_cells_without_a_usable_image_are_placeholders(tmp_path, change, expected):
    table = make_run(tmp_path, models=["m"])
    for key, value in change.items():
        table.loc[2, key] = value
    assert report._cell_source(tmp_path, table.loc[2]) == expected
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "m.png")
    assert grid.getpixel(cell_centre(grid, 1, 0, 3, 2)) == report.PLACEHOLDER_FILL


def test_unreadable_image_is_a_placeholder(tmp_path):
    table = make_run(tmp_path, models=["m"])
    (tmp_path / table.loc[0, "image"]).write_bytes(b"not a png")
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "m.png")
    assert grid.getpixel(cell_centre(grid, 0, 0, 3, 2)) == report.PLACEHOLDER_FILL


def test_cells_take_the_largest_image_size(tmp_path):
    table = make_run(tmp_path, models=["m"])
    Image.new("RGB", (96, 80), colour(5)).save(tmp_path / table.loc[5, "image"])
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "m.png")
    assert grid.getpixel(cell_centre(grid, 2, 1, 3, 2, cell=(96, 80))) == colour(5)
    # a 64px image sits centred, unscaled, in its 96x80 cell
    assert grid.getpixel(cell_centre(grid, 0, 0, 3, 2, cell=(96, 80))) == colour(0)
    assert grid.getpixel((grid.width - 96 * 3 + 2, grid.height - 80 * 2 + 2)) == report.BACKGROUND
    assert grid.getpixel((grid.width - 96 * 3 + 16, grid.height - 80 * 2 + 8)) == colour(0)


def test_extra_seed_axis_doubles_grids(tmp_path):
    table = make_run(tmp_path, seeds=[1, 2])
    paths = report.build_grids(table, tmp_path, "stack", "prompt", ["style"])
    assert [p.name for p in paths] == [
        "tiny_sd1__seed-1.png",
        "tiny_sd1__seed-2.png",
        "tiny_sdxl__seed-1.png",
        "tiny_sdxl__seed-2.png",
    ]
    grid = grid_for(paths, "tiny_sdxl__seed-2.png")
    i = job_index(table, model="tiny_sdxl", stack="ink 0.5", style=STYLES[1], seed=2)
    assert grid.getpixel(cell_centre(grid, 2, 1, 3, 2)) == colour(i)


def test_axis_that_does_not_vary_is_a_single_column(tmp_path):
    table = make_run(tmp_path, models=["m"])
    paths = report.build_grids(table, tmp_path, "scheduler", "prompt", ["style"])
    assert [p.name for p in paths] == ["m__stack-none.png", "m__stack-ink_0.8___grain_0.6.png", "m__stack-ink_0.5.png"]
    grid = grid_for(paths, "m__stack-ink_0.5.png")
    assert grid.width == report.MIN_LABEL_W + CELL
    assert grid.getpixel(cell_centre(grid, 0, 1, 1, 2)) == colour(5)


def test_model_on_an_axis_with_nothing_else_varying_gives_one_grid(tmp_path):
    table = make_run(tmp_path, stacks=["none"], styles=["a"])
    paths = report.build_grids(table, tmp_path, "model", "stack", ["style"])
    assert [p.name for p in paths] == ["grid.png"]
    grid = grid_for(paths, "grid.png")
    assert grid.getpixel(cell_centre(grid, 1, 0, 2, 1)) == colour(1)


def test_prompt_axis_absorbs_its_slots(tmp_path):
    table = make_run(tmp_path)
    paths = report.build_grids(table, tmp_path, "prompt", "stack", ["style"])
    assert [p.name for p in paths] == ["tiny_sd1.png", "tiny_sdxl.png"]  # not split per style


def test_slot_axis_does_not_split_by_the_prompt_it_fills(tmp_path):
    table = make_run(tmp_path)
    paths = report.build_grids(table, tmp_path, "style", "stack", ["style"])
    assert [p.name for p in paths] == ["tiny_sd1.png", "tiny_sdxl.png"]
    grid = grid_for(paths, "tiny_sd1.png")
    i = job_index(table, model="tiny_sd1", stack="ink 0.5", style=STYLES[1])
    assert grid.getpixel(cell_centre(grid, 1, 2, 2, 3)) == colour(i)


def test_slot_axis_groups_by_template_when_templates_differ(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=["none"])
    other = table.assign(
        job_id=["a", "b"],
        prompt_template="{style}, a cat",
        prompt=[f"{s}, a cat" for s in STYLES],
    )
    table = pd.concat([table, other], ignore_index=True)
    names = [p.name for p in report.build_grids(table, tmp_path, "style", "stack", ["style"])]
    assert len(names) == 2
    assert names[0].startswith("m__template-a_portrait_of__alf__in__style_")
    assert names[1] == "m__template-_style___a_cat.png"


def test_file_names_are_sanitised_and_unique(tmp_path):
    table = make_run(tmp_path, models=["my model/v1", "my model:v1", "x" * 300], stacks=["none"], styles=["a"])
    names = [p.name for p in report.build_grids(table, tmp_path, "stack", "prompt", ["style"])]
    assert len(set(names)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.png", n) for n in names)
    assert all(re.fullmatch(r"my_model_v1-[0-9a-f]{8}\.png", n) for n in names[:2])
    assert len(names[2]) < 100 and names[2].startswith("xxxx")


def test_empty_table_writes_nothing(tmp_path):
    table = make_run(tmp_path).iloc[0:0]
    assert report.build_grids(table, tmp_path, "stack", "prompt", ["style"]) == []


def test_labels_scale_with_cell_size(tmp_path):
    small = make_run(tmp_path / "small", models=["m"])
    big = make_run(tmp_path / "big", models=["m"], size=(384, 384))
    (small_grid,) = report.build_grids(small, tmp_path / "small", "stack", "prompt", ["style"])
    (big_grid,) = report.build_grids(big, tmp_path / "big", "stack", "prompt", ["style"])
    with Image.open(small_grid) as s, Image.open(big_grid) as b:
        small_top, big_top = s.height - 2 * CELL, b.height - 2 * 384
    assert big_top > 2 * small_top


# ---------------------------------------------------------------- wrapping


def test_wrap_fits_width_and_keeps_triggers_whole():
    font = ImageFont.load_default(size=12)
    text = "a portrait of <alf> in <cartoona> style with <verylongtriggername_v2> and more words"
    lines = wrap_label(text, font, 60, 20)
    assert len(lines) > 2
    joined = " ".join(lines)
    for trigger in ("<alf>", "<cartoona>", "<verylongtriggername_v2>"):
        assert trigger in joined
    # a trigger wider than the box overflows on its own line rather than being split
    assert all(font.getlength(line) <= 60 for line in lines if not re.fullmatch(r"<[^<>]*>", line))


def test_wrap_caps_lines_with_ellipsis():
    font = ImageFont.load_default(size=12)
    lines = wrap_label("one two three four five six seven eight nine ten", font, 40, 2)
    assert len(lines) == 2
    assert lines[-1].endswith("...")
    assert font.getlength(lines[-1]) <= 40


def test_wrap_breaks_long_word_but_not_inside_trigger():
    font = ImageFont.load_default(size=12)
    lines = wrap_label("abcdefghijklmnop<alf>qrstuvwxyz", font, 50, 10)
    assert len(lines) > 1
    assert "".join(lines) == "abcdefghijklmnop<alf>qrstuvwxyz"
    assert any("<alf>" in line for line in lines)


# ---------------------------------------------------------------- index.html


def test_index_links_images_grids_and_escapes_text(tmp_path):
    table = make_run(tmp_path, skip={1})
    grids = report.build_grids(table, tmp_path, "stack", "prompt", ["style"])
    path = build_index(table, tmp_path, grids, {"sweep": "styles", "jobs": "12 <ok>"})
    assert path == tmp_path / "index.html"
    page = path.read_text(encoding="utf-8")
    for image in table["image"]:
        if image:
            assert f'<a class="open" href="{image}"><img src="{image}" loading="lazy" width="64"' in page
    for grid in grids:
        assert f'src="grids/{grid.name}"' in page
    assert "&lt;alf&gt;" in page and "<alf>" not in page
    assert "12 &lt;ok&gt;" in page
    assert "http://" not in page and "https://" not in page
    (skipped_row,) = [line for line in page.splitlines() if "has no file for" in line]
    assert skipped_row.startswith('<tr class="skipped"')
    ok_rows = [line for line in page.splitlines() if line.startswith("<tr") and "images/" in line]
    assert len(ok_rows) == len(table) - 1 and all('class="skipped"' not in r for r in ok_rows)
    assert '<td class="size">64x64</td>' in page
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["index.html"]  # temp file renamed away


def test_index_marks_failed_and_pending_rows(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=["none"])
    table.loc[0, ["status", "error"]] = ["failed", "boom & bust"]
    table.loc[1, "status"] = float("nan")
    page = build_index(table, tmp_path, [], {}).read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("<tr ")]
    assert rows[0].startswith('<tr class="failed"') and "boom &amp; bust" in rows[0]
    assert rows[1].startswith('<tr class="pending"') and ">pending<" in rows[1]


# ---------------------------------------------------------------- weight axes, z sub-grids, pages

WEIGHTS = ["none", "ink 1", "ink 0.5", "ink 0.8 + grain 0.6"]  # 1 before 0.5: columns must come out sorted


def colours_in(image: Image.Image) -> set[tuple[int, int, int]]:
    return {rgb for _, rgb in image.getcolors(image.width * image.height)}


def test_weight_axis_sorts_weights_and_groups_by_the_rest_of_the_stack(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=WEIGHTS)
    paths = report.build_grids(table, tmp_path, "weight:ink", "style", ["style"])
    assert [p.name for p in paths] == ["m__others-none.png", "m__others-grain_0.6.png"]
    grid = grid_for(paths, "m__others-none.png")
    assert grid.width == report.MIN_LABEL_W + 3 * CELL  # no ink, ink 0.5, ink 1
    for col, stack in enumerate(["none", "ink 0.5", "ink 1"]):
        for row, style in enumerate(STYLES):
            i = job_index(table, stack=stack, style=style)
            assert grid.getpixel(cell_centre(grid, col, row, 3, 2)) == colour(i), (stack, style)
    grain = grid_for(paths, "m__others-grain_0.6.png")
    assert grain.width == report.MIN_LABEL_W + CELL
    i = job_index(table, stack=WEIGHTS[3], style=STYLES[1])
    assert grain.getpixel(cell_centre(grain, 0, 1, 1, 2)) == colour(i)


def test_weight_labels_and_order():
    from batchgen import axes

    assert axes.weight_label("grain:0.6;ink:0.8", "ink") == "ink 0.8"
    assert axes.weight_label("ink:0.5/0.25", "ink") == "ink 0.5/0.25"
    assert axes.weight_label("grain:0.6", "ink") == "no ink"
    labels = ["ink 1", "ink 0.25/1", "no ink", "ink 0.5", "ink -0.5"]
    assert sorted(labels, key=axes.weight_sort_key) == ["no ink", "ink -0.5", "ink 0.25/1", "ink 0.5", "ink 1"]
    assert stack_label("grain:0.6;ink:0.8", ["ink"]) == "grain 0.6"
    assert stack_label("ink:0.8", ["ink"]) == "none"
    assert stack_label("grain:0.6;ink:0.8/0.4") == "grain 0.6 + ink 0.8/0.4"


def test_weight_axis_of_a_lora_no_stack_uses_raises(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=WEIGHTS)
    expected = (
        "sweep.grid.x: unknown axis 'weight:inq' (did you mean 'weight:ink'?); choose one of: model, stack, prompt, "
        "seed, steps, guidance_scale, width, height, scheduler, clip_skip, prompt_syntax, max_sequence_length, epoch, "
        "style, weight:grain, weight:ink, blocks:grain, blocks:ink"
    )
    with pytest.raises(BatchgenError, match=f"^{re.escape(expected)}$"):
        report.build_grids(table, tmp_path, "weight:inq", "style", ["style"])


def test_z_axis_equal_to_x_raises(tmp_path):
    table = make_run(tmp_path, seeds=[1, 2])
    with pytest.raises(BatchgenError, match=r"^sweep\.grid: x and z are both 'seed'; choose three different axes$"):
        report.build_grids(table, tmp_path, "seed", "style", ["style"], z="seed")


def test_z_subgrids_sit_side_by_side_in_one_image(tmp_path):
    table = make_run(tmp_path, models=["m"], seeds=[1, 2])
    paths = report.build_grids(table, tmp_path, "stack", "style", ["style"], z="seed")
    assert [p.name for p in paths] == ["m.png"]  # seed is on the grid, so it does not split grids
    grid = grid_for(paths, "m.png")
    gap = CELL // 8  # the gap between sub-grids at 64 px cells
    assert grid.width == report.MIN_LABEL_W + 2 * 3 * CELL + gap
    top = grid.height - 2 * CELL
    for layer, seed in enumerate([1, 2]):
        for col, stack in enumerate(STACKS):
            for row, style in enumerate(STYLES):
                x = report.MIN_LABEL_W + layer * (3 * CELL + gap) + col * CELL + CELL // 2
                i = job_index(table, stack=stack, style=style, seed=seed)
                assert grid.getpixel((x, top + row * CELL + CELL // 2)) == colour(i), (seed, stack, style)
    between = grid.crop((report.MIN_LABEL_W + 3 * CELL, top, report.MIN_LABEL_W + 3 * CELL + gap, grid.height))
    assert colours_in(between) == {report.BACKGROUND}


def test_z_cells_missing_from_one_layer_are_placeholders(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=["none"], seeds=[1, 2])
    table = table[~((table["seed"] == 2) & (table["style"] == STYLES[1]))]  # that job was never planned
    (path,) = report.build_grids(table, tmp_path, "style", "stack", ["style"], z="seed")
    with Image.open(path) as img:
        grid = img.convert("RGB")
    gap, top = CELL // 8, grid.height - CELL
    second_layer_second_col = (report.MIN_LABEL_W + 2 * CELL + gap + CELL + CELL // 2, top + CELL // 2)
    assert grid.getpixel(second_layer_second_col) == report.PLACEHOLDER_FILL
    assert report._cell_source(tmp_path, None) == "no job"


def test_corner_names_the_axes(tmp_path):
    from batchgen.report.text import font, line_height

    table = make_run(tmp_path, models=["m"])
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "style", ["style"]), "m.png")
    title_h = line_height(font(report.MIN_FONT)) + 2 * 3  # one title line, padding 3 at the smallest font
    corner = grid.crop((0, title_h, report.MIN_LABEL_W, grid.height - 2 * CELL)).convert("L")
    assert min(level for _, level in corner.getcolors(256)) < 64  # "x: stack" / "y: style" drawn there


def test_grid_over_the_size_guard_is_split_into_pages_by_rows(tmp_path):
    styles = [f"style {i}" for i in range(6)]
    table = make_run(tmp_path, models=["m"], stacks=STACKS, styles=styles)
    (whole,) = report.build_grids(table, tmp_path, "stack", "style", ["style"])
    with Image.open(whole) as img:
        full_w, full_h = img.size
    limit = full_w * (full_h - 3 * CELL) / 1e6  # room for about half the rows per page
    paths = report.build_grids(table, tmp_path, "stack", "style", ["style"], max_megapixels=limit)
    assert [p.name for p in paths] == ["m-p1.png", "m-p2.png", "m-p3.png"]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["m-p1.png", "m-p2.png", "m-p3.png"]
    seen: list[tuple[int, int, int]] = []
    for path in paths:
        with Image.open(path) as img:
            page = img.convert("RGB")
        assert page.width == full_w and page.width * page.height <= limit * 1e6
        seen += [c for c in (colour(i) for i in range(len(table))) if c in colours_in(page)]
    assert sorted(seen) == sorted(colour(i) for i in range(len(table)))  # every job on exactly one page


def page_height(rows: int, z_band: bool = False) -> int:
    """Height of one page of a split grid at 64 px cells: a title band sized for the longest title, a z band
    of one line, one header line (plus the corner's two axis lines), then the rows."""
    from batchgen.report.text import font, line_height

    line_h, pad = line_height(font(report.MIN_FONT)), 3
    title = (report.TITLE_LINES + 1) * line_h + 2 * pad
    return title + (line_h + 2 * pad if z_band else 0) + 2 * line_h + 2 * pad + rows * CELL


def test_a_single_row_too_wide_is_split_by_columns(tmp_path):
    stacks = [f"ink {w}" for w in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    table = make_run(tmp_path, models=["m"], stacks=stacks, styles=["a"])
    limit = (report.MIN_LABEL_W + 2 * CELL) * page_height(1) / 1e6  # two columns and their labels, not three
    paths = report.build_grids(table, tmp_path, "stack", "style", ["style"], max_megapixels=limit)
    assert [p.name for p in paths] == ["m-p1.png", "m-p2.png", "m-p3.png"]
    for n, path in enumerate(paths):
        with Image.open(path) as img:
            page = img.convert("RGB")
        assert page.size == (report.MIN_LABEL_W + 2 * CELL, page_height(1))
        assert colour(2 * n) in colours_in(page) and colour(2 * n + 1) in colours_in(page)


def test_z_layers_are_the_first_thing_pages_split(tmp_path):
    table = make_run(tmp_path, models=["m"], seeds=[1, 2, 3])
    one_layer_w = report.MIN_LABEL_W + 3 * CELL
    limit = one_layer_w * page_height(2, z_band=True) / 1e6
    paths = report.build_grids(table, tmp_path, "stack", "style", ["style"], z="seed", max_megapixels=limit)
    assert len(paths) == 3
    for seed, path in zip([1, 2, 3], paths, strict=True):
        with Image.open(path) as img:
            page = img.convert("RGB")
        assert page.size == (one_layer_w, page_height(2, z_band=True))
        expected = {colour(job_index(table, stack=s, style=st, seed=seed)) for s in STACKS for st in STYLES}
        assert expected <= colours_in(page)
        assert not {colour(i) for i in range(len(table))} - expected & colours_in(page)


def test_size_guard_must_be_positive(tmp_path):
    table = make_run(tmp_path, models=["m"])
    expected = r"^report\.max_grid_megapixels: 0 is not a positive number of megapixels; try 64$"
    with pytest.raises(BatchgenError, match=expected):
        report.build_grids(table, tmp_path, "stack", "style", ["style"], max_megapixels=0)


def test_rebuilding_with_other_axes_removes_the_old_grids(tmp_path):
    table = make_run(tmp_path, seeds=[1, 2])
    report.build_grids(table, tmp_path, "stack", "style", ["style"])
    assert len(list((tmp_path / "grids").iterdir())) == 4
    paths = report.build_grids(table, tmp_path, "stack", "style", ["style"], z="seed")
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == sorted(p.name for p in paths)
    assert [p.name for p in paths] == ["tiny_sd1.png", "tiny_sdxl.png"]


def test_report_modules_import_no_torch():
    import subprocess
    import sys

    modules = (
        "batchgen.report.grids, batchgen.report.index, batchgen.report.rebuild, batchgen.report.diff, batchgen.axes"
    )
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_degenerate_image_gets_a_red_frame_and_corner_and_the_others_do_not(tmp_path):
    table = make_run(tmp_path)
    flagged = job_index(table, model="tiny_sd1", stack=STACKS[1], style=STYLES[0])
    table["degenerate"] = "no"
    table.loc[flagged, "degenerate"] = "flat"
    grid = grid_for(report.build_grids(table, tmp_path, "stack", "prompt", ["style"]), "tiny_sd1.png")
    for (col, stack), (row, style) in itertools.product(enumerate(STACKS), enumerate(STYLES)):
        i = job_index(table, model="tiny_sd1", stack=stack, style=style)
        x, y = cell_centre(grid, col, row, 3, 2)
        corner = (x + CELL // 2 - 2, y - CELL // 2 + 1)  # inside the top-right triangle
        edge = (x, y + CELL // 2 - 1)  # the bottom edge, on the frame
        assert grid.getpixel((x, y)) == colour(i)  # the image itself stays readable
        expected = report.MARK_FILL if i == flagged else colour(i)
        assert (grid.getpixel(corner), grid.getpixel(edge)) == (expected, expected), (stack, style)
