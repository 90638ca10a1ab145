"""Publishing and loading models on the Hugging Face Hub (every family and head).

    python -m util.hub push --ckpt RUN --repo USER/NAME        # convert and upload
    python -m util.hub push --ckpt RUN --local_dir DIR         # the same files, no network
    python -m util.hub download USER/NAME                      # into the HF cache, for offline use

    from util.hub import from_pretrained, save_pretrained, push_to_hub
    model = from_pretrained("USER/NAME")                       # or a folder, or any checkpoint

A published model is config.json + model.safetensors (EMA weights) + README.md (util/io/pretrained.py);
`sample.py --ckpt` and `main_mar.py --evaluate --resume` take the folder or the repo id.
"""
from util.hub.export import Published, from_pretrained, published_from_checkpoint, push_to_hub, save_pretrained

__all__ = ["Published", "from_pretrained", "published_from_checkpoint", "push_to_hub", "save_pretrained"]
