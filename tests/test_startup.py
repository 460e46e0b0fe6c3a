"""Start-up (issue 17): `kiln train` on the default digits config imports only what it uses before
its first training step. No torchmetrics (the default metrics are torchkiln's), no torchvision (no
transforms, no image data), no matplotlib (the plots are drawn at the end), no timm. TensorBoard is
imported: the first step's row is logged at its end. The garbage collector is paused while the
command sets up and runs again, with the set-up's objects frozen, once the loop starts (gcpause.py)."""

from __future__ import annotations

import json

from conftest import ROOT, kiln

PROBE = '''
import gc, json, os, sys
from torchkiln.engine.callbacks import Callback


class FirstStep(Callback):
    def on_fit_start(self, trainer):
        self.set_up = {"enabled": gc.isenabled(), "full_passes": gc.get_stats()[2]["collections"]}

    def on_step_end(self, trainer, info):
        heavy = ("torchmetrics", "torchvision", "matplotlib", "timm")
        with open(os.environ["KILN_PROBE_OUT"], "w") as f:
            json.dump({"imported": sorted(m for m in heavy if m in sys.modules), "set_up": self.set_up,
                       "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, f)
'''


def test_kiln_train_imports_no_heavy_library_before_its_first_step(tmp_path):
    (tmp_path / "first_step_probe.py").write_text(PROBE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: startup\noutput_dir: {tmp_path / 'runs'}\ntrainer: {{epochs: 1}}\n"
                   "callbacks: [{type: 'first_step_probe:FirstStep'}]\nlogging: {progress: false}\n")
    out = tmp_path / "imported.json"
    kiln("train", "-c", str(cfg), "-q", cwd=tmp_path, check=True,
         env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}", "KILN_PROBE_OUT": str(out)})
    seen = json.loads(out.read_text())
    assert seen["imported"] == []
    # Set-up without a full collection (~0.7 s of them with torch and sklearn imported) ...
    assert seen["set_up"] == {"enabled": False, "full_passes": 0}
    # ... and the collector back on for the loop, the set-up's objects (torch's modules) frozen.
    assert seen["enabled"] and seen["frozen"] > 100_000


def test_the_collector_pause_is_the_cli_s_alone_and_every_other_command_lifts_it(tmp_path):
    import gc
    import weakref

    from torchkiln import gcpause
    from torchkiln.cli import main

    gcpause.resume()  # no pause taken: a no-op (a program importing torchkiln keeps its collector)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gcpause.pause()
    try:
        assert not gc.isenabled()
        assert main(["list", "models"]) == 0  # not `train`: resumed before the command runs
        assert gc.isenabled() and not gcpause.paused()
    finally:
        gc.enable()
        gc.unfreeze()

    class Part:  # a set-up's throwaway part in a cycle (a batch-size search's Trainer and model)
        pass

    gcpause.pause()
    try:
        part = Part()
        part.me = part
        gone = weakref.ref(part)
        del part
        gcpause.resume()
        assert gone() is None  # freed before the freeze, not kept for the whole run
    finally:
        gc.enable()
        gc.unfreeze()
