"""scripts/device_check.py in its CI-sized form (--quick) runs green on the CPU."""

import json

from tests.conftest import load_script


def test_device_check_quick(tmp_path):
    mod = load_script("device_check")
    out = tmp_path / "dc.json"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] and {r["machine"] for r in res["correctness"]} >= {"els", "bbels", "is", "pca", "soft-els"}
    whats = " ".join(r["what"] for r in res["timings"]["rows"])
    for part in ("els exact step", "bbels exact step", "is exact step", "pca step", "certified search", "DDIM sample",
                 "differentiable calibration step", "training step CIFAR10_ResNet", "training step CIFAR10_UNet"):
        assert part in whats, part
    assert not res["timings"]["skipped_over_budget"]
    plan_row = next(r for r in res["timings"]["rows"] if "vs plan (cpu)" in r["what"])
    assert plan_row["predicted_s"] > 0 and plan_row["predicted_flops"] > 0 and plan_row["measured_over_predicted"] > 0
