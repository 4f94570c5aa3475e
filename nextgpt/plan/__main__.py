"""``python -m nextgpt.plan [train.py overrides ...] [--json FILE]``

Prints the memory and time plan of the run the same overrides would start, before any weight
loads (shapes from the backbones' configs, built on the meta device). A comma in ``stage=``,
``strategy=`` or ``trainer.devices=`` plans every combination, as a sweep would run them:

    python -m nextgpt.plan model=nextgpt_7b_legacy stage=1,2,3 strategy=ddp,fsdp trainer.devices=1,8
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Sequence

from nextgpt.config import ConfigError, compose
from nextgpt.plan import PlanSettings, make_plan
from nextgpt.plan.meta import PlanError
from nextgpt.schema import validate
from nextgpt.spec import run_spec

SWEPT = ("stage", "strategy", "trainer.devices")


def expand(overrides: Sequence[str]) -> list[list[str]]:
    fixed, axes = [], []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key in SWEPT and "," in value:
            axes.append([f"{key}={v}" for v in value.split(",")])
        else:
            fixed.append(o)
    return [[*fixed, *combo] for combo in itertools.product(*axes)] if axes else [fixed]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    out_json = None
    if "--json" in argv:
        i = argv.index("--json")
        if i + 1 >= len(argv):
            print("error: --json needs a file name", file=sys.stderr)
            return 2
        out_json = argv[i + 1]
        del argv[i : i + 2]
    plans = []
    for overrides in expand(argv):
        try:
            cfg = compose([*overrides, "print_config=false"])
            validate(cfg)
            plan = make_plan(run_spec(cfg), PlanSettings.of(cfg))
        except (ConfigError, PlanError) as e:
            print(f"error: {' '.join(overrides)}: {e}", file=sys.stderr)
            return 2
        print(plan.table(), end="\n\n")
        plans.append({"overrides": overrides, **plan.as_dict()})
    if len(plans) > 1:
        print(
            f"{'stage':>5} {'strategy':24s} {'ranks':>5} {'GiB/rank':>9} {'ckpt GiB':>9} "
            f"{'host GiB':>9} {'tokens/s':>10}"
        )
        for p in plans:
            print(
                f"{p['stage']:>5} {p['strategy']:24s} {p['world_size']:>5} {p['total_gib']:9.1f} "
                f"{p['total_other_checkpointing_gib']:9.1f} {sum(p['host_gib'].values()):9.1f} "
                f"{p['tokens_per_s']:10,.0f}"
            )
    if out_json:
        with open(out_json, "w") as f:
            json.dump(plans, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
