"""Start-up (issue 17): `kiln train` on the default digits config imports only what it uses before
its first training step. No torchmetrics (the default metrics are torchkiln's), no torchvision (no
transforms, no image data), no matplotlib (the plots are drawn at the end), no timm. TensorBoard is
imported: the first step's row is logged at its end."""

from __future__ import annotations

import json

from conftest import ROOT, kiln

PROBE = '''
import json, os, sys
from torchkiln.engine.callbacks import Callback


class FirstStep(Callback):
    def on_step_end(self, trainer, info):
        heavy = ("torchmetrics", "torchvision", "matplotlib", "timm")
        with open(os.environ["KILN_PROBE_OUT"], "w") as f:
            json.dump(sorted(m for m in heavy if m in sys.modules), f)
'''


def test_kiln_train_imports_no_heavy_library_before_its_first_step(tmp_path):
    (tmp_path / "first_step_probe.py").write_text(PROBE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: startup\noutput_dir: {tmp_path / 'runs'}\ntrainer: {{epochs: 1}}\n"
                   "callbacks: [{type: 'first_step_probe:FirstStep'}]\nlogging: {progress: false}\n")
    out = tmp_path / "imported.json"
    kiln("train", "-c", str(cfg), "-q", cwd=tmp_path, check=True,
         env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}", "KILN_PROBE_OUT": str(out)})
    assert json.loads(out.read_text()) == []
