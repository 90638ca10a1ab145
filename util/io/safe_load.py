"""Weights-only reading of torch weight files (and pickle-free reading of numpy arrays), with one-line errors.

Full unpickling runs whatever code a file names, so a planted file in a shared cache or a wrong
path would execute it. Every weight file is read with ``torch.load(weights_only=True)``; when
that refuses a file, the error says why in one line (torch's own advice is to retry with
``weights_only=False``, which is exactly what must not be done with an untrusted file).
"""
import re
import zipfile

import torch

_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def why_unreadable(err):
    """The informative part of a loader error, on one line (torch's advice to drop weights_only is left out)."""
    text = str(err)
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if refused:
        return (f"it pickles {refused.group(1)}, which weights-only loading refuses (only tensors, "
                "containers, numbers, strings and argparse.Namespace are allowed)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_TORCH_BOILERPLATE)]
    detail = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
    return f"corrupt, truncated or not a torch/safetensors file ({detail})"


def load_weights_only(path, what):
    """torch.load(path) with weights_only=True on the CPU; a file it cannot read is a one-line ValueError
    starting with `what` (the flag or file role to fix)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # every parser error means the same thing here: not a usable weight file
        raise ValueError(f"{what} {path} is not a readable weight file: {why_unreadable(err)}") from err


def why_array_unreadable(err):
    """What is wrong with a .npy/.npz file that numpy refused, on one line.

    numpy's own message for a file it cannot parse suggests turning allow_pickle on, which would unpickle
    (run) whatever the file names: arrays are only ever read with allow_pickle=False.
    """
    text = str(err)
    if "contains pickled" in text:  # neither an .npy header nor a zip archive: numpy fell back to pickle
        return "not a numpy .npy/.npz file (no numpy header or zip archive; pickled data is never loaded)"
    if "Object arrays" in text or "Python objects" in text:
        return "it holds an array of Python objects (dtype object), which is never unpickled"
    if isinstance(err, EOFError) or "mmap length" in text or "not fully written" in text:
        return "the file is empty or truncated (shorter than its header says)"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"corrupt or not a numpy file ({type(err).__name__}{': ' + first if first else ''})"


# what np.load raises for a file it cannot read (zipfile.BadZipFile: a cut-short or corrupt .npz)
ARRAY_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile)
