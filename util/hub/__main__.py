"""python -m util.hub push --ckpt RUN (--repo USER/NAME | --local_dir DIR) [--license ID] [--private]
   python -m util.hub download USER/NAME[@REVISION]

push converts any checkpoint (a run folder, a checkpoint file, the ARINAR / MAR releases, a published
folder or repo) into config.json + model.safetensors (EMA weights) + README.md (the model card), then
uploads them to the Hub repo (created if needed; log in with `hf auth login` or set HF_TOKEN).
With --local_dir it only writes the files there (no network; with --repo too, the card names that repo).
download fetches a repo into the Hugging Face cache, for machines that run with HF_HUB_OFFLINE=1.
"""
import argparse
import logging
import tempfile
from pathlib import Path

from util.hub.export import DEFAULT_LICENSE, published_from_checkpoint
from util.io.pretrained import WEIGHTS_NAME, check_destination, parse_repo_id

logger = logging.getLogger("util.hub")


def get_parser():
    parser = argparse.ArgumentParser(prog="python -m util.hub", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="publish a checkpoint (or write the files with --local_dir)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    push.add_argument("--ckpt", required=True, help="run folder, checkpoint file, published folder or repo id")
    push.add_argument("--repo", default=None, help="Hub model repo USER/NAME to upload to")
    push.add_argument("--local_dir", default=None, help="write the files to this new or empty folder, no upload")
    push.add_argument("--license", default=DEFAULT_LICENSE, help="the weights' license (a Hub license id)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--eval_root", default=None,
                      help="folder holding eval-*/metrics.json of these weights (default: the run folder)")
    download = commands.add_parser("download", help="fetch USER/NAME[@REVISION] into the Hugging Face cache")
    download.add_argument("repo", help="Hub model repo USER/NAME[@REVISION]")
    return parser


def check_push_args(args):
    if args.repo is None and args.local_dir is None:
        raise ValueError("push needs --repo USER/NAME (upload) or --local_dir DIR (write the files only)")
    if args.repo is not None and (parse_repo_id(args.repo) is None or "@" in args.repo):
        raise ValueError(f"--repo must be a Hub repo id USER/NAME; got {args.repo!r}")
    if args.local_dir is not None:
        try:
            check_destination(args.local_dir)
        except ValueError as err:
            raise ValueError(f"--local_dir {err}") from None


def push(args):
    logger.info("reading %s", args.ckpt)
    published = published_from_checkpoint(args.ckpt, eval_root=args.eval_root)
    config = published.config
    logger.info("%s: family %s, head %s, %s parameters, %s weights, %d evaluation(s) of these weights",
                args.ckpt, config.family, config.head, f"{published.num_params():,}", published.facts["weights"],
                len(published.facts["evaluations"]))
    name = args.repo or args.local_dir
    if args.local_dir is not None:
        folder = published.write(args.local_dir, name=name, license=args.license)
        size = (folder / WEIGHTS_NAME).stat().st_size / 2 ** 20
        upload_hint = f"; upload it with `python -m util.hub push --ckpt {folder} --repo {args.repo}`"
        logger.info("wrote %s (config.json, %s %.1f MiB, README.md); load it with `python sample.py --ckpt %s`%s",
                    folder, WEIGHTS_NAME, size, folder, upload_hint if args.repo else "")
        return folder
    from util.hub.remote import upload
    with tempfile.TemporaryDirectory() as tmp:
        folder = published.write(Path(tmp) / "model", name=name, license=args.license)
        url = upload(folder, args.repo, private=args.private)
    logger.info("pushed %s to %s; load it with `python sample.py --ckpt %s`", args.ckpt, url, args.repo)
    return url


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "download":
            repo = parse_repo_id(args.repo)
            if repo is None:
                raise ValueError(f"not a Hub repo id USER/NAME[@REVISION]: {args.repo!r}")
            from util.hub.remote import download
            folder = download(*repo)
            logger.info("%s is in the cache: %s", args.repo, folder)
            return folder
        check_push_args(args)
        return push(args)
    except (FileNotFoundError, ValueError) as err:  # bad files, flags or Hub answers: one line, no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
