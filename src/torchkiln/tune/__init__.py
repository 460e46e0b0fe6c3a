"""`kiln tune`: a hyperparameter search over any config key with Ray Tune (ASHA, Optuna).

- `distributions.py`: the `tune.space` forms (`{loguniform: [lo, hi]}`, ...), checked by the schema.
- `space.py`: every searched key exists and every value it can take passes config validation,
  before Ray starts; a trial's config from its sampled values.
- `search.py`: Ray (local or a cluster), the scheduler, the searcher, the Tuner and its restore.
- `results.py`: the trials' table (`trials.csv`), `best.yaml` and `plots/`.

Each trial is an ordinary torchkiln run (`commands/tune.py` calls `commands/train.py:train`), and
it reports every epoch through `callbacks/tune_report.py:TuneReport`.
"""
