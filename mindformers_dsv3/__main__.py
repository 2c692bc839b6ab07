"""`python -m mindformers_dsv3 paths`: the folders a user passes to stock MindFormers.

    python -m mindformers_dsv3 paths            # both, one per line: register=..., configs=...
    python -m mindformers_dsv3 paths register   # just the --register_path / REGISTER_PATH folder
    python -m mindformers_dsv3 paths configs    # just the shipped YAMLs
"""
import sys

from mindformers_dsv3 import paths

_FOLDERS = {"register": paths.register_dir, "configs": paths.configs_dir}


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "paths" or len(args) > 2 or (len(args) == 2 and args[1] not in _FOLDERS):
        print("usage: python -m mindformers_dsv3 paths [register|configs]", file=sys.stderr)
        return 2
    if len(args) == 2:
        print(_FOLDERS[args[1]]())
    else:
        for name, folder in _FOLDERS.items():
            print(f"{name}={folder()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
