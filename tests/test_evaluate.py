"""The model card's tables: per-z and per-field numbers from an evaluation result."""

from __future__ import annotations

import pytest

from napari_deepr.evaluate import do_no_harm, do_no_harm_table, markdown_table, per_field_table


def _row(z, out_a, out_b):
    fields = {
        "a": {"ssim_input": 0.7, "ssim_output": out_a, "ssim_rl": 0.8, "ssim_landweber": 0.75, "dpm_mae": 1.0},
        "b": {"ssim_input": 0.9, "ssim_output": out_b, "ssim_rl": 0.9, "ssim_landweber": 0.85, "dpm_mae": 0.2},
    }
    keys = ("ssim_input", "ssim_output", "ssim_rl", "ssim_landweber", "dpm_mae")
    mean = {k: (fields["a"][k] + fields["b"][k]) / 2 for k in keys}
    rmse = {f"rmse_{k}": 0.1 for k in ("input", "output", "rl", "landweber")}
    return {"z_um": float(z), **mean, **rmse, "dpm_mae_all": 0.5, "fields": fields}


def test_per_field_table_averages_each_field_over_the_z_band():
    result = {"per_z": [_row(0, 0.99, 0.99), _row(2, 0.6, 0.95), _row(-3, 0.7, 0.97), _row(6, 0.1, 0.1)]}
    table = per_field_table(result, 2, 5)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith(("| a", "| b"))}
    # only z = 2 and -3 count: field a (0.6 + 0.7) / 2, field b (0.95 + 0.97) / 2
    assert "**0.650**" in lines["a"] and "**0.960**" in lines["b"]
    assert "| 1.00 |" in lines["a"] and "| 0.20 |" in lines["b"]
    assert "2 ≤ |z| ≤ 5" in table
    assert per_field_table({"per_z": [{"z_um": 3.0}]}) == ""  # results from before per-field numbers
    assert "**0.650**" not in markdown_table(result) and "| +2 |" in markdown_table(result)


def test_summary_of_the_tilt_sweep_over_specimen_types():
    from napari_deepr.evaluate import summarize

    rows = [{**_row(z, 0.9, 0.9), "dpm_oor_fraction": 0.8} for z in (-6, -2, 0, 3, 6)]
    tilt = {"true_deg": 1.5, "fitted_deg": 1.6, "error_deg": 0.1,
            "fitted_deg_by_specimen": {"cells": [1.7, 1.9], "tissue": [1.4, 1.2]}}
    s = summarize({"per_z": rows, "tilt": tilt}, (-5, 5))
    assert s["tilt_fitted_deg"] == 1.6
    # the target is on every specimen type: |1.9 - 1.5| = 0.4 > 0.2 fails it
    assert s["tilt_worst_error_deg_by_specimen"] == pytest.approx(0.4) and not s["targets"]["tilt_within_0.2deg_every_specimen"]
    # |1.7-1.5|, |1.9-1.5|, |1.4-1.5|, |1.2-1.5| -> mean 0.25; range over all fits
    assert abs(s["tilt_mean_error_deg_by_specimen"] - 0.25) < 1e-9
    assert s["tilt_fitted_range_deg_by_specimen"] == [1.2, 1.9]


def test_reserve_fields_are_summarized_apart_from_the_headline_means():
    from napari_deepr.evaluate import summarize

    rows = []
    for z in (-3, 0, 2, 6):
        r = {**_row(z, 0.6, 0.8), "dpm_oor_fraction": 0.8}
        r["fields"]["m#0 (reserve)"] = {"ssim_input": 0.5, "ssim_output": 0.9 if z == 2 else 0.7, "ssim_rl": 0.6,
                                         "ssim_landweber": 0.55, "dpm_mae": 0.3}
        rows.append(r)
    s = summarize({"per_z": rows, "reserve_fields": ["m#0 (reserve)"]}, (-5, 5))
    # only z = -3 and 2 are in the 2-5 µm band: (0.7 + 0.9) / 2; the headline mean ignores the reserve
    assert abs(s["reserve_ssim_output_2to5"] - 0.8) < 1e-12 and abs(s["reserve_dpm_mae_2to5"] - 0.3) < 1e-12
    assert abs(s["mean_ssim_output_2to5"] - 0.7) < 1e-12


def test_do_no_harm_takes_the_worst_near_focus_change_per_field_and_the_dpm_at_focus():
    from napari_deepr.evaluate import summarize

    rows = []
    for z, a_out, b_out in ((-1, 0.72, 0.95), (0, 0.695, 0.97), (1, 0.75, 0.96), (3, 0.9, 0.9)):
        r = _row(z, a_out, b_out)
        r["dpm_oor_fraction"] = 0.0
        for n, d in (("a", 0.3), ("b", 0.9)):
            r["fields"][n]["dpm_mean"] = d + abs(z)
        rows.append(r)
    res = {"per_z": rows, "real_fields": ["b"]}
    d = do_no_harm(res)
    # field a: input 0.7 everywhere, outputs 0.72 / 0.695 / 0.75 -> worst -0.005 at z = 0; b: 0.9 -> +0.05
    assert d["do_no_harm_worst_field"] == "a" and d["do_no_harm_worst_delta"] == pytest.approx(-0.005)
    assert d["do_no_harm_delta_by_field"]["b"]["+0"] == pytest.approx(0.07)
    assert d["dpm_mean_in_focus_by_field"] == {"a": 0.3, "b": 0.9}
    assert d["dpm_mean_in_focus"] == pytest.approx(0.6) and d["dpm_mean_in_focus_worst"] == pytest.approx(0.9)
    s = summarize(res, (-5, 5))
    assert s["targets"]["do_no_harm_le1um(out>=in-0.01 every field)"]  # within the 0.01 allowed
    assert not s["targets"]["dpm_mean_in_focus<=0.6"]
    table = do_no_harm_table({"summary": s})
    assert "| a | +0.020 | -0.005 | +0.050 | 0.30 |" in table
