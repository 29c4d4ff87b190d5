"""Pick, on the validation split, each family's best configuration at small budgets; write the test studies for the picks.

    python scripts/select_small_budget.py

Reads the results of figures/studies/small_budget_selection.toml (validation, N = L/16 and L/8),
ranks every configuration of each family (mobile splats; fixed grid; DCT) by its mean token
accuracy over both budgets and both prompt sets, and writes:
- figures/data/ablations/small_budget_selection/selection.json: every configuration's validation
  means and each family's pick;
- figures/studies/small_budget_test.toml and small_budget_test_ood.toml: the picks only (their
  settings copied from the selection study), at N = L/16, L/8, L/4, on the test split and on the
  out-of-domain licences, as in rate_distortion.toml. The test split is read by those studies only.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from splatopt import ablate

FAMILIES = {"splats": "splats", "fixed-grid": "fixed-grid", "dct": "dct"}  # family: method-name prefix


def family(method: str) -> str:
    for name, prefix in FAMILIES.items():
        if method == prefix or method.startswith(prefix + "-"):
            return name
    raise ValueError(f"method {method!r} belongs to no family ({', '.join(FAMILIES)})")


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans: TOML and JSON spell them alike


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="figures/studies/small_budget_selection.toml")
    parser.add_argument("--results", default="figures/data/ablations/small_budget_selection")
    parser.add_argument("--out-studies", default="figures/studies")
    args = parser.parse_args()

    methods = tomllib.loads(Path(args.study).read_text())["factors"]["method"]
    rows = ablate.read_rows(args.results)
    means = {}
    for method in methods:
        values = [r["token_accuracy"] for r in rows if r["levels"]["method"] == method]
        if len(values) != 4:  # 2 budgets x 2 prompt sets
            raise ValueError(f"{args.results}: {method} has {len(values)} rows, expected 4: run the selection study first")
        means[method] = sum(values) / len(values)
    picks = {}
    for method, mean in means.items():  # first listed wins a tie: the incumbent
        f = family(method)
        if f not in picks or mean > means[picks[f]]:
            picks[f] = method
    Path(args.results, "selection.json").write_text(json.dumps(
        {"criterion": "mean token accuracy over N = L/16 and L/8 and 2 x 256 validation prompts",
         "validation_mean": means, "picks": picks}, indent=1))
    lines = [f"{name} = {toml_value(methods[picks[f]])}" for f, name in ((f, picks[f]) for f in FAMILIES)]
    for corpus, stem in (("stdlib:test", "small_budget_test"), ("licenses", "small_budget_test_ood")):
        text = "\n".join([
            f'description = "Test of the configurations picked on validation by scripts/select_small_budget.py (each family\'s best mean token accuracy over N = L/16 and L/8 in small_budget_selection.toml), on {corpus}, 300 steps, as rate_distortion.toml."',
            f'corpus = "{corpus}"', "prompts = 256", "prompt_sets = 2", "max_tokens = 64", "seeds = [0]", "",
            "[base]", "steps = 300", "record_every = 0", "", "[factors]", "n_splats = [0.0625, 0.125, 0.25]", "",
            "[factors.method]", *lines, ""])
        ablate.Study.parse(text, stem)  # a malformed study fails here, not on the GPU
        Path(args.out_studies, f"{stem}.toml").write_text(text)
    print(json.dumps({"picks": picks, "validation_mean": {m: round(v, 4) for m, v in means.items()}}, indent=1))


if __name__ == "__main__":
    main()
