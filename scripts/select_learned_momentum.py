"""Pick, on the validation split, the learned start's inner update for short budgets; write the test studies for the pick.

    python scripts/select_learned_momentum.py                                        # Adam momenta
    python scripts/select_learned_momentum.py --name learned_metric --budgets 10 20   # the Fisher metric
    python scripts/select_learned_momentum.py --name learned_warmup --budgets 10 20   # a warm-up for it

Reads the results of figures/studies/<name>_selection.toml (validation, N = L/4; learned_momentum:
10 and 30 steps, learned_metric: 10 and 20), ranks the learned start's configurations by mean
token accuracy over the budgets and both prompt sets (the first listed wins a tie), and writes:
- figures/data/ablations/<name>_selection/selection.json: every configuration's validation mean
  and the pick;
- figures/studies/<name>_{test,ood,third_domain}.toml: the pick only, after 0 to 300 inner steps
  on the prompts of learned_init.toml, learned_init_ood.toml and third_domain.toml, so its rows
  pair with those studies' grid rows. The test split is read by those studies only.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from select_small_budget import toml_value

from splatopt import ablate

STEPS = {"learned_momentum": [0, 1, 2, 3, 5, 10, 20, 30, 40, 50, 60, 70, 80, 100, 300],
         "learned_metric": [0, 1, 2, 3, 5, 10, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 40, 50, 60, 80, 100, 300],
         "learned_warmup": [0, 1, 2, 3, 5, 10, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 40, 50, 60, 80, 100, 300]}
TESTS = {  # stem suffix: (corpus, prompts), as the studies whose grid rows the picks pair with
    "test": ("stdlib:test", 512),
    "ood": ("licenses", 512),
    "third_domain": ("figures/corpora/seed_essays.txt", 79),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="learned_momentum", choices=sorted(STEPS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 30], help="the inner-step budgets the pick is ranked on")
    parser.add_argument("--out-studies", default="figures/studies")
    args = parser.parse_args()
    study, results = f"figures/studies/{args.name}_selection.toml", f"figures/data/ablations/{args.name}_selection"
    SHORT = tuple(args.budgets)

    methods = tomllib.loads(Path(study).read_text())["factors"]["method"]
    rows = ablate.read_rows(results)
    short = {}
    for method in methods:
        values = {s: [r["token_accuracy"] for r in rows if r["levels"]["method"] == method and r["levels"]["steps"] == s]
                  for s in SHORT}
        if any(len(v) != 2 for v in values.values()):  # 2 prompt sets per budget
            raise ValueError(f"{results}: {method} lacks rows ({ {s: len(v) for s, v in values.items()} } per budget, "
                             "expected 2): run the selection study first")
        short[method] = sum(sum(values[s]) for s in SHORT) / (2 * len(SHORT))
    names = list(methods)
    pick = max(names, key=lambda m: (short[m], -names.index(m)))
    Path(results, "selection.json").write_text(json.dumps(
        {"criterion": f"mean token accuracy over {' and '.join(map(str, SHORT))} inner steps and 2 x 256 validation prompts, N = L/4",
         "validation_mean": short, "pick": pick}, indent=1))
    what = {"learned_momentum": "inner Adam momenta", "learned_metric": "inner update in the decoder's Fisher metric",
            "learned_warmup": "learning-rate warm-up of the inner update in the decoder's Fisher metric"}[args.name]
    for suffix, (corpus, prompts) in TESTS.items():
        stem = f"{args.name}_{suffix}"
        text = "\n".join([
            f'description = "The learned start with the {what} picked on validation by scripts/select_learned_momentum.py ({pick}: the best mean token accuracy over {" and ".join(map(str, SHORT))} steps in {args.name}_selection.toml), after 0 to 300 inner steps at N = L/4 on {corpus}, the prompts of the learned-init studies."',
            f'corpus = "{corpus}"', f"prompts = {prompts}", "max_tokens = 64", "seeds = [0]", "",
            "[base]", "n_splats = 0.25", "record_every = 0", "", "[factors]", f"steps = {STEPS[args.name]}", "",
            "[factors.method]", f"{pick} = {toml_value(methods[pick])}", ""])
        ablate.Study.parse(text, stem)  # a malformed study fails here, not on the GPU
        Path(args.out_studies, f"{stem}.toml").write_text(text)
    print(json.dumps({"pick": pick, "validation_mean": {m: round(v, 4) for m, v in short.items()}}, indent=1))


if __name__ == "__main__":
    main()
