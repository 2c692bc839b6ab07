"""What MindFormers 1.7.0's `run_mindformer.py` does for `--run_mode predict`, for machines without a
MindFormers source checkout (the script is not in the wheel). Tests run the real script instead when
`MINDFORMERS_HOME` points at a checkout; both take the same command line:

    python tests/dist/stock_predict.py --config YAML --register_path DIR --predict_data TEXT \
        [--use_parallel True] [--load_checkpoint PATH] [--options key=value ...]
    msrun --worker_num=2 ... tests/dist/stock_predict.py --config YAML ... --use_parallel True

The stock script's steps, in its order: relative --config / --register_path are taken from the
script's own folder; REGISTER_PATH is set and appended to sys.path; MindFormerConfig(--config); the
CLI overrides (use_parallel, load_checkpoint, then --options through merge_from_dict); input_data;
then main(): set_output_path, build_context, Trainer(config).predict(predict_checkpoint=
config.load_checkpoint, input_data=..., batch_size=config.predict_batch_size, adapter_id=...).
Stock predict writes `text_generation_result.txt` in the working directory.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _bool(text):
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"not a bool: {text!r}")


def main(argv=None):
    from mindformers.tools.register import ActionDict  # parses `key=value` pairs as the stock script does

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--register_path")
    parser.add_argument("--use_parallel", type=_bool)
    parser.add_argument("--load_checkpoint")
    parser.add_argument("--predict_data", nargs="+")
    parser.add_argument("--options", nargs="+", action=ActionDict)
    args = parser.parse_args(argv)
    config_path = args.config if os.path.isabs(args.config) else os.path.join(HERE, args.config)
    if args.register_path is not None:
        register = args.register_path if os.path.isabs(args.register_path) else os.path.join(HERE, args.register_path)
        os.environ["REGISTER_PATH"] = register
        if register not in sys.path:
            sys.path.append(register)

    from mindformers import MindFormerConfig, Trainer, build_context
    from mindformers.tools import set_output_path

    config = MindFormerConfig(config_path)
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.options:
        config.merge_from_dict(args.options)
    data = args.predict_data
    if isinstance(data, list) and len(data) == 1:
        data = data[0].replace(r"\n", "\n")
    config.input_data = data

    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config)
    trainer.predict(predict_checkpoint=config.load_checkpoint, input_data=config.input_data,
                    batch_size=config.predict_batch_size, adapter_id=config.adapter_id)


if __name__ == "__main__":
    main()
