"""Record one edit for the edit-trajectory figure: fit, edit (an insertion and a deletion), re-fit.

    python figures/data_edit_trajectory.py            # CPU, seconds; writes figures/data/edit_trajectory.json

The built-in sample text (``splatopt demo``) is fitted with the default model, N = L/4, 300 steps.
Then a phrase is inserted and another deleted with ``splatopt.edit`` (60 re-fit steps, local, the
warm start alone: no second starts), so the record shows splats transported, spawned in the
inserted span and pruned in the deleted one. For comparison it also records the token accuracy of the
same edit with edit()'s defaults (second starts beside the warm one) and of a cold fit of the new text.
The JSON holds :func:`splatopt.plot.edit_trajectory_series` and how it was made; the figure script
(figures/edit_trajectory.py) plots only from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt.cli import DEMO_TEXT
from splatopt.plot import edit_trajectory_series

INSERT_BEFORE, INSERTED = "list containing", "freshly allocated "
DELETED = " from the iterable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of the first fit")
    parser.add_argument("--refit-steps", type=int, default=60)
    parser.add_argument("--splats", type=float, default=0.25, help="splats per token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "edit_trajectory.json"))
    args = parser.parse_args()

    model = fixedpos.load()
    before = splatopt.fit(DEMO_TEXT, model, n_splats=args.splats, steps=args.steps, device=args.device,
                          record_every=5, progress=False)
    insert_at, delete_at = DEMO_TEXT.index(INSERT_BEFORE), DEMO_TEXT.index(DELETED)
    edits = [(insert_at, insert_at, INSERTED), (delete_at, delete_at + len(DELETED), "")]
    # the warm start alone: the figure shows the transport itself, not a second start chosen over it
    after = splatopt.edit(before, edits=edits, model=model, steps=args.refit_steps, record_every=2, progress=False,
                          fresh_start=False, fresh_near=False)
    series = edit_trajectory_series(before, after, model)
    # what the figure's warm start is measured against: edit()'s defaults (second starts beside the
    # warm one) in the same steps, and a cold fit of the new text for the first fit's steps
    default = splatopt.edit(before, edits=edits, model=model, steps=args.refit_steps, record_every=0, progress=False)
    cold = splatopt.fit(series["new_text"], model, n_splats=args.splats, steps=args.steps, device=args.device,
                        record_every=0, progress=False)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "device": args.device if args.device != "cpu" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": model.name, "layer": model.layer, "n_splats": args.splats,
        "steps": args.steps, "refit_steps": args.refit_steps, "edits": [list(e) for e in edits], **series,
        "accuracy_default_edit": float(default.token_accuracy[0]), "accuracy_cold": float(cold.token_accuracy[0]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"{len(series['old_tokens'])} -> {len(series['new_tokens'])} tokens; transported {len(series['transported'])}, "
          f"pruned {len(series['pruned'])}, spawned {len(series['spawned'])}; accuracy {series['accuracy_before']:.2%} "
          f"-> {series['accuracy_after']:.2%} (edit()'s defaults {record['accuracy_default_edit']:.2%}, cold fit "
          f"{record['accuracy_cold']:.2%})\nwrote {args.out}")


if __name__ == "__main__":
    main()
