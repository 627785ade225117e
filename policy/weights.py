"""A diffusers transformer's weights, read a part at a time, and written back: shared by every family (policy/).

    WeightFiles          a model folder's safetensors files, read a part at a time
    load_transformer     the transformer built without memory, then filled with only this process's part
    weights_problem      '' when a transformer folder's weights are whole, else what is wrong (headers only)
    fingerprint_files    a cheap digest of folders (the prompt cache's key, args.json's model digest)
    save_model_folder    a trained transformer written as a model folder its pipeline loads
"""
import hashlib
import json
import re
import struct
from pathlib import Path

import torch


class WeightFiles:
    """A diffusers model folder's weights (one safetensors file, or several named by its `*.safetensors.index.json`)
    and config, read a part at a time: `read([(key, index, shape)])` yields (key, tensor[index]) for each, in the
    file's dtype, after checking that the file holds `shape`. Each file is opened (mapped) once per call and closed
    after it, and only the bytes of the parts are read: the rows of a row-major tensor are one contiguous range, so a
    rank that reads its Shard(0) rows touches its share of the file. `transformer_class` builds the model."""

    def __init__(self, folder, transformer_class):
        from safetensors import safe_open
        self.folder, self.open, self.transformer_class = Path(folder), safe_open, transformer_class
        self.config = transformer_class.load_config(self.folder)
        index = sorted(self.folder.glob("*.safetensors.index.json"))
        if index:
            self.files = {k: self.folder / f for k, f in json.loads(index[0].read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"{self.folder} holds no safetensors weights (diffusers' save_pretrained format)")

    def read(self, items):
        by_file = {}
        for key, index, shape in items:
            if key not in self.files:
                raise KeyError(f"{self.folder} holds no weight {key}")
            by_file.setdefault(self.files[key], []).append((key, index, tuple(shape)))
        for file, group in by_file.items():
            with self.open(file, framework="pt") as f:
                for key, index, shape in group:
                    part = f.get_slice(key)
                    if tuple(part.get_shape()) != shape:
                        raise ValueError(f"{file}: {key} has shape {tuple(part.get_shape())}, the config gives {shape}")
                    yield key, part[index] if shape else f.get_tensor(key)


def blocks(transformer) -> list:
    """The transformer's blocks, in order: the items of every ModuleList directly under its root (FLUX:
    transformer_blocks then single_transformer_blocks; SD3 and Qwen-Image: transformer_blocks). launch.sharding.shard_model
    makes each one FSDP unit; load_transformer fills the weights one block at a time."""
    return [b for child in transformer.children() if isinstance(child, torch.nn.ModuleList) for b in child]


def build_empty(transformer_class, config: dict, dtype):
    """The transformer of `config` with every parameter on the meta device in `dtype` (no memory, no random init) and
    its buffers and other constant tensors real (SD3's position table, Qwen-Image's rotary frequencies), computed by
    its __init__ on the CPU and cast as from_pretrained casts them (floating buffers to `dtype`).

    Built on the meta device outright (nothing is allocated). The constant tensors that leaves on the meta device
    (none for FLUX) are taken from a donor: the same class with one block of each kind, built with only its parameters
    sent to the meta device as they are registered (accelerate's init_empty_weights: each of its layers' weights is
    allocated uninitialised on the CPU for an instant); the whole model is so built only when a constant lives in a
    block."""
    from accelerate import init_empty_weights
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    with torch.device("meta"):
        transformer = transformer_class.from_config(config)
    if missing := _meta_constants(transformer):
        small = {k: min(v, 1) if k.startswith("num_") and k.endswith("layers") and isinstance(v, int) else v
                 for k, v in config.items()}  # num_layers, num_single_layers: the constants do not depend on them
        with init_empty_weights(include_buffers=False):
            donor = transformer_class.from_config(small)
        if any(_get(donor, name) is None for name in missing):  # a constant inside a block: the whole model
            with init_empty_weights(include_buffers=False):
                donor = transformer = transformer_class.from_config(config)
        for name in missing:
            owner, attr = name.rpartition(".")[::2]
            module = transformer.get_submodule(owner)
            if attr in module._buffers:
                module._buffers[attr] = _get(donor, name)
            else:
                setattr(module, attr, _get(donor, name))
    keep = transformer_class._keep_in_fp32_modules or []  # None for FLUX, SD3, Qwen-Image; from_pretrained's rule
    for name, m in transformer.named_modules():
        fp32 = any(k in f"{name}.".split(".") for k in keep)
        for n, p in list(m.named_parameters(recurse=False)):
            m.register_parameter(n, torch.nn.Parameter(p.to(torch.float32 if fp32 else dtype),
                                                       requires_grad=p.requires_grad))
    for m in transformer.modules():
        for n, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[n] = b.to(dtype)
    return transformer


def _get(module, name: str):
    """The buffer or plain tensor attribute `name` ('pos_embed.pos_freqs') of `module`, or None."""
    owner, attr = name.rpartition(".")[::2]
    try:
        value = getattr(module.get_submodule(owner), attr)
    except AttributeError:
        return None
    return value if torch.is_tensor(value) and not value.is_meta else None


def _meta_constants(module) -> list:
    """Names of the buffers and plain tensor attributes of `module` that are on the meta device."""
    found = [n for n, b in module.named_buffers() if b.is_meta]
    for name, m in module.named_modules():
        found += [f"{name}.{k}" for k, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_meta]
    return found


def load_transformer(weights, device="cpu", dtype=torch.float32, prepare=None):
    """The transformer (weights.transformer_class) in `dtype` on `device` from `weights` (a WeightFiles, or anything
    with its .config, .transformer_class and .read: bench/scale.py reads fake tensors), of which this process only
    ever holds its own part: the whole model in one process, its shard under FSDP2, plus one block's part in flight.

    1. built with meta parameters (build_empty: no memory, no random init; buffers real);
    2. `prepare(transformer)` may change it there and returns the module to fill: train.load_model adds the LoRA
       adapters (policy.lora.add_lora makes them real, with their seeded values) and shards it (launch.sharding.shard_model:
       FSDP2's fully_shard takes meta parameters);
    3. every parameter gets memory for its local part only (to_empty: a plain tensor whole, a DTensor its local
       shard, FSDP2 and HSDP alike) and is filled block by block with the rows it holds, read and cast to its dtype
       as from_pretrained casts them. Parameters that `prepare` made real (the adapters) keep their values. Buffers
       are whole on every rank (FSDP2 does not shard them): a persistent one is read from the file, as from_pretrained
       reads it (SD3's position table: a converted checkpoint's values, rounding included, need not be those its
       __init__ computes); a non-persistent one keeps its computed value (to_empty would leave it uninitialised)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    transformer = build_empty(weights.transformer_class, weights.config, dtype)
    prefixes = tuple(f"{name}." for name, child in transformer.named_children() if isinstance(child, torch.nn.ModuleList))
    module = prepare(transformer) if prepare is not None else transformer

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p
    with torch.no_grad():
        kept = {n: local(p).clone() for n, p in module.named_parameters() if not p.is_meta}
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in module.named_buffers()}
        if any(isinstance(p, DTensor) for p in module.parameters()):
            module.to_empty(device=device)  # FSDP2 re-registers its shards in its _apply
        else:
            _replace_parameters(module, lambda p: torch.empty_like(p, device=device))
        for m in module.modules():
            for n, b in m._buffers.items():
                if b is not None:
                    m._buffers[n] = torch.empty_like(b, device=device)
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
        persistent = {f"{m_name}.{n}".lstrip(".") for m_name, m in module.named_modules() for n, b in m._buffers.items()
                      if b is not None and n not in m._non_persistent_buffers_set}
        own = dict(module.named_buffers())
        for key, part in weights.read([(n, tuple(slice(0, k) for k in own[n].shape), own[n].shape)
                                       for n in sorted(persistent)]):
            own[key].copy_(part.to(own[key].dtype))
        params, by_block = dict(module.named_parameters()), {}
        for name, p in params.items():
            if name in kept:
                local(p).copy_(kept.pop(name))
                continue
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements) \
                if isinstance(p, DTensor) else (p.shape, (0,) * p.dim())
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            key = name.replace(".base_layer.", ".")  # an adapted layer's own weight, as the file names it
            block = re.match(r"(\w+\.\d+\.)?", name)[0]  # 'transformer_blocks.3.', or '' for the root's own
            by_block.setdefault(block if block.startswith(prefixes) else "", {})[key] = (name, index, p.shape)
        for block in by_block.values():
            for key, part in weights.read([(key, index, shape) for key, (_, index, shape) in block.items()]):
                target = local(params[block[key][0]])
                target.copy_(part.to(target.dtype))
    return module


def _replace_parameters(module, fn):
    """Every parameter p of `module` replaced by a new one holding fn(p), requires_grad kept (by assignment, where
    .to() and .to_empty() swap fake tensors in place, which they refuse: bench/scale.py)."""
    for m in module.modules():
        for n, p in list(m.named_parameters(recurse=False)):
            m.register_parameter(n, torch.nn.Parameter(fn(p), requires_grad=p.requires_grad))


def save_model_folder(path, state_dict, config, model_dir, transformer_class):
    """Write a model folder at `path`: `model_dir` with its transformer replaced by one of `config` holding
    `state_dict` (diffusers format); the other components are symlinked. The family's pipeline and its
    Policy.from_pretrained load it. The same weights and settings give the same bytes (config.json without the
    `_name_or_path` that from_pretrained records). Written beside as path.tmp, then swapped in
    (policy/export_folder.py)."""
    from policy.export_folder import fresh, sort_headers, swap_in
    path, model_dir = Path(path), Path(model_dir)
    tmp = fresh(path)
    with torch.device("meta"):
        plain = transformer_class.from_config({k: v for k, v in config.items() if k != "_name_or_path"})
    plain.load_state_dict(state_dict, assign=True, strict=False)  # non-persistent buffers are not in state_dict
    plain.save_pretrained(tmp / "transformer")
    sort_headers(tmp / "transformer")
    for item in model_dir.iterdir():
        if item.name != "transformer" and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item.resolve())
    return swap_in(tmp, path)


def fingerprint_files(roots) -> str:
    """sha256 (hex) of the files under the folders `roots`, in order: every file's path relative to its root's
    parent and its size; small files (configs, vocabularies) hashed whole, bigger ones (weights) by three 1 MiB
    slices (start, middle, end). An edit that only touches unsampled bytes of a same-size file goes unnoticed."""
    h, mib = hashlib.sha256(), 1 << 20
    for root in map(Path, roots):
        for file in sorted(root.rglob("*")):
            if not file.is_file():
                continue
            size = file.stat().st_size
            h.update(f"{file.relative_to(root.parent)}:{size}\n".encode())
            with open(file, "rb") as fh:
                if size <= 4 * mib:
                    h.update(fh.read())
                else:
                    for offset in (0, size // 2, size - mib):
                        fh.seek(offset)
                        h.update(fh.read(mib))
    return h.hexdigest()


# ---------------------------------------------------------------- the weights, checked from their headers alone
def weights_problem(folder) -> str:
    """'' when the model folder `folder` (e.g. <root>/transformer) holds whole safetensors weights, else what is wrong,
    naming the file as <folder name>/<file>: none at all, a sharded index naming a missing file, a cut file."""
    folder = Path(folder)
    if not list(folder.glob("*.safetensors")):
        return f"{folder.name}/ holds no *.safetensors weights (diffusers' save_pretrained format)"
    for index in sorted(folder.glob("*.safetensors.index.json")):  # a sharded model
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{folder.name}/{index.name} is damaged (not a JSON weight_map)"
        if missing := [f for f in named if not (folder / f).is_file()]:
            return f"{folder.name}/{missing[0]} is missing ({folder.name}/{index.name} names it)"
    for file in sorted(folder.glob("*.safetensors")):
        if why := safetensors_problem(file):
            return f"{folder.name}/{file.name}: {why}"
    return ""


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses a longer header


def safetensors_problem(path) -> str:
    """'' when `path` is a whole safetensors file, else what is wrong in a few words ("truncated: 1234 of 5678 bytes",
    "not a safetensors file"). Only the header is read: its 8-byte length, its JSON, and the end of the last tensor's
    data, which must be the end of the file (the library refuses a file of another length)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= SAFETENSORS_MAX_HEADER:
                return f"not a safetensors file ({'empty' if size == 0 else f'{size} bytes, no header'})"
            if size < 8 + n:
                return f"truncated: {size} of at least {8 + n} bytes (cut in its header)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    except ValueError:  # not UTF-8 or not JSON
        return "not a safetensors file (its header is not JSON)"
    try:
        end = max([0] + [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "not a safetensors file (its header lists no tensors' data_offsets)"
    if size < 8 + n + end:
        return f"truncated: {size} of {8 + n + end} bytes"
    if size > 8 + n + end:
        return f"damaged: {size} bytes, its header describes {8 + n + end}"
    return ""
