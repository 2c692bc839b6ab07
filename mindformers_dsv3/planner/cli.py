"""dsv3-plan: check a YAML's parallel layout against the model and print each device's memory plan.

    dsv3-plan CONFIG.yaml [--devices N] [--device-memory 64GB] [--run-mode predict|train|finetune]
              [--set parallel_config.model_parallel=16 ...] [--json] [--sharding]

--sharding (train / finetune): also print the MindSpore strategy of every parameter (sharding.py) and
check that its per-device shapes and stages equal the plan's.

Exit status: 0 valid and fits; 1 invalid layout or config (the message names the keys);
3 valid but does not fit (the message names what to change); 2 bad command line.
"""
import argparse
import difflib
import json
import os
import sys

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_NO_FIT = 0, 1, 2, 3


def _parser():
    p = argparse.ArgumentParser(prog="dsv3-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 fits, 1 invalid layout/config, 3 does not fit, 2 usage")
    p.add_argument("config", help="a MindFormers YAML (base_config chains are followed)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices to plan for: data_parallel*model_parallel*pipeline_stage must equal it "
                        "(default: the YAML's device_num, else that product)")
    p.add_argument("--device-memory", default=None, help="memory of one device, e.g. 64GB (GB = 2**30 B; default 64GB)")
    p.add_argument("--run-mode", choices=("predict", "train", "finetune"), default=None,
                   help="override the YAML's run_mode")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML key before planning (YAML value syntax), repeatable")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--sharding", action="store_true",
                   help="train/finetune: print MindSpore's per-parameter strategies and check them against the plan")
    return p


def _overrides(items, parser):
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: use KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _yaml_chain(path, config_error, chain=()):
    """Check a YAML and its base_config chain as MindFormers will read it (base paths relative to the
    YAML's folder): every file exists and holds a mapping, and no file includes itself."""
    import yaml
    subject = f"base_config {path} (named in {chain[-1]})" if chain else "the file"
    if os.path.realpath(path) in {os.path.realpath(p) for p in chain}:
        raise config_error(f"{subject} makes a cycle: {' -> '.join(chain + (path,))}")
    if not os.path.isfile(path):
        raise config_error(f"{subject} does not exist (or is not a file)")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise config_error(f"{subject} cannot be read as YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        what = "is empty" if tree is None else f"holds a YAML {type(tree).__name__}"
        raise config_error(f"{subject} {what}; a MindFormers YAML is a mapping of sections "
                           "(model, parallel_config, ...)")
    bases = tree.get("base_config") or []
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise config_error(f"base_config={base!r} in {path} must be a file name (or a list of them)")
        _yaml_chain(os.path.join(os.path.dirname(path), base), config_error, chain + (path,))


# --set keys checked by the reader of their section (it names an unknown key itself), and keys the
# planner reads that MindFormers' YAML template does not fill in
_CHECKED_BY_READER = ("model.model_config.", "recompute_config.")
_PLANNER_KEYS = ("device_num",)


def _check_override_keys(path, overrides, config_error):
    """An --set key must name a key of the YAML (after MindFormers fills in its template). Reading the
    YAML here also turns MindFormers' own refusals (nesting depth, mixed key types) into one line."""
    from mindformers.tools.register.config import MindFormerConfig
    from mindformers_dsv3.config import plain
    try:
        tree = plain(MindFormerConfig(path))
    except Exception as err:  # pylint: disable=broad-except - MindFormers' own checks (depth, key types, ...)
        raise config_error(f"MindFormers cannot read the YAML chain: {type(err).__name__}: {err}") from None
    for key in overrides:
        if key in _PLANNER_KEYS or key.startswith(_CHECKED_BY_READER):
            continue
        parts, node = key.split("."), tree
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the top level"
            if not isinstance(node, dict):
                raise config_error(f"--set {key}: {where} is a value, not a section")
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
                hint = f"; did you mean '{'.'.join(parts[:depth] + close[:1])}'?" if close else ""
                raise config_error(f"--set {key}: no key '{part}' in {where}{hint}")
            node = node[part]


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be >= 1")
    overrides = _overrides(args.overrides, parser)
    os.environ.setdefault("GLOG_v", "3")
    import logging
    from mindformers.tools.logger import get_logger
    from mindformers_dsv3.config import ConfigError
    from mindformers_dsv3.planner.plan import make_plan
    from mindformers_dsv3.planner.report import format_plan
    get_logger().setLevel(logging.ERROR)  # MindFormers' YAML template warns about every section it fills in
    try:
        _yaml_chain(args.config, ConfigError)  # MindFormers would answer these with a traceback
        _check_override_keys(args.config, overrides, ConfigError)
        result = make_plan(args.config, devices=args.devices, device_memory=args.device_memory, run_mode=args.run_mode,
                      overrides=overrides)
    except ConfigError as err:  # LayoutError is a ConfigError
        print(f"dsv3-plan: {args.config}: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_plan(result))
    if args.sharding:
        from mindformers_dsv3.planner.sharding_check import check_against_plan, sharding_of_plan
        try:
            sharding = sharding_of_plan(result)
        except ConfigError as err:
            print(f"dsv3-plan: {args.config}: {err}", file=sys.stderr)
            return EXIT_INVALID
        print(sharding.describe())
        differences = check_against_plan(sharding, result)
        if differences:
            print(f"dsv3-plan: {args.config}: sharding differs from the plan: " + "; ".join(differences[:10]),
                  file=sys.stderr)
            return EXIT_INVALID
        print("sharding  per-device shapes and pipeline stages equal the plan")
    problems = result.fit_problems()
    if problems:
        print(f"dsv3-plan: {args.config}: " + "; ".join(problems), file=sys.stderr)
        return EXIT_NO_FIT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
