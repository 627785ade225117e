"""FLUX.1-dev as the policy of G2RPO: the velocity v_theta(x_t, t, c) that Eqs. 1-3 step with.

The transformer is called exactly as diffusers' FluxPipeline calls it, so that sampling with
sde.ode_step on our grid reproduces the pipeline's own images (tests/test_flux.py checks it).

    code            paper / meaning
    ----            ---------------
    x               x_t, packed latents (B, L, C): 2x2 patches of the (c, h, w) latent as tokens,
                    L = (h/2)(w/2), C = 4c (c = 16 with the VAE -> C = 64; 720 px: L = 2025)
    t               (B,) sigmas in [0, 1], t = 1 noise; samples of one batch may differ. The
                    transformer gets timestep = t (it multiplies by 1000 inside); the reference
                    code feeds int(t * 1000) / 1000, which we do not
    cond            c: T5 sequence embeddings (1, S, 4096), S = max_sequence_length (512), and the
                    CLIP pooled embedding (1, 768), as FluxPipeline.encode_prompt computes them
    guidance        the distilled guidance scale (3.5) fed as an embedding; there is no CFG
    f               pixels per latent cell: 8 with the VAE, 1 in pixel-space mode
    img_ids, txt_ids  rotary position ids: (0, row, col) per packed token, zeros per text token

Pixel-space mode (the CPU toy world): when model_index.json names no VAE, the latent IS the RGB
image in [-1, 1] (c = 3, f = 1, C = 12) and decoding is (x + 1) / 2. With the VAE, decoding is
vae.decode(x / scaling_factor + shift_factor) / 2 + 0.5, both clamped to [0, 1].

The text encoders (9 GB for T5-XXL) are never kept: `encode_prompts` loads them, encodes what is
missing, stores the embeddings (in memory, or one .pt file per prompt under cache_dir, keyed by a
fingerprint of the encoders, the max length, the dtype and the prompt) and frees them again. Every weight is
read straight onto the device in the dtype it runs in: the transformer part by part (load_transformer: under
FSDP2 each rank reads only its own shard), the text encoders through from_pretrained's device_map.
"""
import gc
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from report.files import atomic_write
from sde import ode_step, sigma_grid

ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
LAYOUT = "model_index.json, transformer/, vae/ (optional), " + "/, ".join(ENCODER_PARTS) + "/"
DEFAULTS = {"height": 720, "width": 720, "max_sequence_length": 512, "guidance": 3.5}  # the paper's


@dataclass
class Cond:
    """The conditioning c of one prompt (batch 1)."""
    prompt_embeds: torch.Tensor  # (1, S, D) T5 sequence
    pooled: torch.Tensor  # (1, P) CLIP pooled


class FluxPolicy:
    """The transformer (+ VAE) held in memory; prompts encoded on demand.

    Conventions chosen here, against FluxPipeline.__call__ (which the parity test matches in fp32):
    - x stays float32 between steps and only the transformer runs in `dtype`; the pipeline keeps
      its latents in the model dtype (bf16 for FLUX.1-dev), rounding x after every step.
    - x_T is drawn in float32; the pipeline draws it in the text encoders' dtype.
    - default size 720x720 (the paper's training size; the pipeline's default is 1024), and a size
      that is not a multiple of 2f is refused (the pipeline silently rounds it down).
    """

    def __init__(self, root, transformer, vae, height, width, max_sequence_length, guidance,
                 device="cpu", dtype=torch.bfloat16, cache_dir=None, embed_dtype=None):
        self.root, self.transformer, self.vae = Path(root), transformer, vae
        self.device, self.dtype = torch.device(device), dtype
        self.embed_dtype = embed_dtype or dtype  # the prompt embeddings as stored (the precision they are used in)
        self.max_sequence_length, self.guidance = int(max_sequence_length), float(guidance)
        if not 0 < self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (T5 limit), got {max_sequence_length}")
        self.c = 3 if vae is None else vae.config.latent_channels
        self.f = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        if transformer.config.in_channels != 4 * self.c:
            raise ValueError(f"transformer in_channels={transformer.config.in_channels} but "
                             f"{'pixel space (no VAE)' if vae is None else 'the VAE'} gives 4 x {self.c}")
        if height % (2 * self.f) or width % (2 * self.f):
            raise ValueError(f"height and width must be multiples of {2 * self.f}, got {height}x{width}")
        self.height, self.width = int(height), int(width)
        self.h, self.w = height // self.f, width // self.f  # unpacked latent grid
        rows, cols = torch.meshgrid(torch.arange(self.h // 2), torch.arange(self.w // 2), indexing="ij")
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(self.device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._memory = {}  # key -> Cond on CPU, when there is no cache_dir
        self._fingerprint = None

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, height=None, width=None,
                        max_sequence_length=None, guidance=None, cache_dir=None, embed_dtype=None, transformer=None):
        """Load a local diffusers FLUX folder. Unset options come from its g2rpo.json, else DEFAULTS. The
        transformer is read straight onto `device` in `dtype` (load_transformer), or `transformer` is used as given
        (train.py's: sharded before it was filled)."""
        root = Path(path)
        if why := folder_problem(root):
            raise FileNotFoundError(f"FLUX model folder {root} {why}; download black-forest-labs/FLUX.1-dev there, "
                                    "or write the toy model (python -m toy)")
        index = json.loads((root / "model_index.json").read_text())
        has_vae = (index.get("vae") or [None])[0] is not None  # no entry, null or [null, null]
        extra = root / "g2rpo.json"
        opts = {**DEFAULTS, **(json.loads(extra.read_text()) if extra.is_file() else {})}
        given = dict(height=height, width=width, max_sequence_length=max_sequence_length, guidance=guidance)
        opts = {k: given[k] if given[k] is not None else opts[k] for k in DEFAULTS}
        if transformer is None:
            transformer = load_transformer(WeightFiles(root / "transformer"), device, dtype).eval()
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype) if has_vae else None
        vae = vae.to(device).eval() if vae is not None else None
        return cls(root, transformer, vae, **opts, device=device, dtype=dtype, cache_dir=cache_dir,
                   embed_dtype=embed_dtype)

    # ---------------------------------------------------------------- the policy v_theta(x, t, c)
    def velocity(self, cond: Cond, transformer=None):
        """v(x, t) for one prompt: x (B, L, C) float32, t (B,) sigmas -> (B, L, C) float32.

        `transformer` defaults to self.transformer (the trainer passes its FSDP-wrapped module).
        The prompt's embeddings are expanded to the B samples (stride 0, no copy); a cond holding B
        prompts (batch B, one per sample) is used as is. Gradients flow under torch.enable_grad.
        """
        net = self.transformer if transformer is None else transformer
        enc = cond.prompt_embeds.to(self.device, self.dtype)  # (1, S, D), a no-op after embed()
        pooled = cond.pooled.to(self.device, self.dtype)  # (1, P)
        txt_ids = torch.zeros(enc.shape[1], 3, device=self.device)  # (S, 3)
        use_guidance = self.transformer.config.guidance_embeds

        def v(x, t):
            B = x.shape[0]
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B)  # (B,)
            guidance = torch.full((B,), self.guidance, device=x.device) if use_guidance else None
            out = net(hidden_states=x.to(self.dtype), timestep=t, guidance=guidance,
                      encoder_hidden_states=enc.expand(B, -1, -1), pooled_projections=pooled.expand(B, -1),
                      txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False)[0]
            return out.float()  # (B, L, C)
        return v

    # ---------------------------------------------------------------- latents and images
    def rows_velocity(self, conds: list, transformer=None):
        """v(x, t) for rows of several prompts: [(cond, rows)] in order. One prompt: its cond expanded to the rows
        (velocity()); several: their embeddings repeated row by row into one batched cond."""
        if all(c is conds[0][0] for c, _ in conds):
            return self.velocity(conds[0][0], transformer)
        return self.velocity(Cond(torch.cat([c.prompt_embeds.expand(n, -1, -1) for c, n in conds]),
                                  torch.cat([c.pooled.expand(n, -1) for c, n in conds])), transformer)

    def noise(self, n: int, generator=None) -> torch.Tensor:
        """(n, L, C) float32 x_T, drawn like FluxPipeline.prepare_latents (same generator, same x_T)."""
        z = randn_tensor((n, self.c, self.h, self.w), generator=generator, device=self.device, dtype=torch.float32)
        return self.pack(z)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> (B, (h/2)(w/2), 4c): each 2x2 patch becomes one token (c, dy, dx order)."""
        B, c, h, w = z.shape
        z = z.view(B, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, c, 2, 2)
        return z.reshape(B, (h // 2) * (w // 2), 4 * c)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 4c) -> (B, c, h, w), the inverse of pack."""
        B = x.shape[0]
        x = x.view(B, self.h // 2, self.w // 2, self.c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, c, h/2, 2, w/2, 2)
        return x.reshape(B, self.c, self.h, self.w)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Clean packed latents (B, L, C) -> images (B, 3, H, W) float32 in [0, 1], batch_size at a time."""
        images = []
        for x in x0.split(batch_size):
            z = self.unpack(x.float())  # (b, c, h, w)
            if self.vae is None:  # pixel space: z is the image in [-1, 1]
                img = z
            else:
                cfg = self.vae.config
                z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
                img = self.vae.decode(z.to(self.device, self.vae.dtype), return_dict=False)[0].float()
            images.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    # ---------------------------------------------------------------- prompt conditioning c
    def embed(self, prompt: str) -> Cond:
        """The conditioning of one prompt (batch 1, on self.device), encoding it first if needed.

        With a cache_dir the entry is read from disk on every call (4 MB for FLUX.1-dev), and its
        stored fingerprint, max length, dtype and prompt are checked: a mismatch is refused."""
        key = self._key(prompt)
        if not self._has(key):
            self.encode_prompts([prompt])
        if self.cache_dir is None:
            cond = self._memory[key]
        else:
            entry = torch.load(self._path(key), map_location="cpu", weights_only=True)
            want = {"fingerprint": self.fingerprint(), "max_sequence_length": self.max_sequence_length,
                    "dtype": str(self.embed_dtype), "prompt": prompt}
            got = {k: entry.get(k) for k in want}
            if got != want:
                raise ValueError(f"prompt cache entry {self._path(key)} was written for {got}, not {want} "
                                 "(another text encoder, length, dtype or prompt): delete it to recompute")
            cond = Cond(entry["prompt_embeds"], entry["pooled"])
        return Cond(cond.prompt_embeds.to(self.device), cond.pooled.to(self.device))

    @torch.no_grad()
    def encode_prompts(self, prompts, batch_size: int = 16) -> int:
        """Encode the prompts not stored yet, store them, free the encoders. Returns how many were new."""
        todo = [p for p in dict.fromkeys(prompts) if not self._has(self._key(p))]
        if not todo:
            return 0
        tok = CLIPTokenizer.from_pretrained(self.root / "tokenizer")
        tok_2 = T5Tokenizer.from_pretrained(self.root / "tokenizer_2")
        # each weight read straight onto the device in the dtype they run in: never a whole copy in host memory
        where = dict(dtype=self.dtype, device_map={"": self.device})
        clip = CLIPTextModel.from_pretrained(self.root / "text_encoder", **where).eval()
        t5 = T5EncoderModel.from_pretrained(self.root / "text_encoder_2", **where).eval()
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            ids = _tokenize(tok, batch, tok.model_max_length)  # (b, 77)
            ids_2 = _tokenize(tok_2, batch, self.max_sequence_length)  # (b, S)
            pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output.cpu()  # (b, P)
            seq = t5(ids_2.to(self.device), output_hidden_states=False)[0].cpu()  # (b, S, D)
            for j, p in enumerate(batch):
                e = self.embed_dtype
                self._store(p, Cond(seq[j:j + 1].to(e).clone(), pooled[j:j + 1].to(e).clone()))
        del clip, t5, tok, tok_2
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return len(todo)

    def fingerprint(self) -> str:
        """Identifies the text encoders + tokenizers cheaply (fingerprint_files of their folders)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_files([self.root / part for part in ENCODER_PARTS])[:32]
        return self._fingerprint

    def _key(self, prompt: str) -> str:
        ident = json.dumps([self.fingerprint(), self.max_sequence_length, str(self.embed_dtype), prompt])
        return hashlib.sha256(ident.encode()).hexdigest()

    def _has(self, key: str) -> bool:
        return key in self._memory if self.cache_dir is None else self._path(key).is_file()

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.pt"

    def _store(self, prompt: str, cond: Cond):
        key = self._key(prompt)
        if self.cache_dir is None:
            self._memory[key] = cond
            return
        entry = {"fingerprint": self.fingerprint(), "max_sequence_length": self.max_sequence_length,
                 "dtype": str(self.embed_dtype), "prompt": prompt,
                 "prompt_embeds": cond.prompt_embeds, "pooled": cond.pooled}
        data = io.BytesIO()  # saved to memory: the archive's root name is then fixed, not the temporary file's
        torch.save(entry, data)
        atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data.getvalue()))  # several processes share it


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


def save_model_folder(path, state_dict, config, model_dir):
    """Write a model folder at `path`: `model_dir` with its transformer replaced by one of `config` holding
    `state_dict` (diffusers format); the other components are symlinked. FluxPipeline and
    FluxPolicy.from_pretrained load it. The same weights and settings give the same bytes (config.json without
    the `_name_or_path` that from_pretrained records). Written beside as path.tmp, then swapped in
    (policy/export_folder.py)."""
    from policy.export_folder import fresh, sort_headers, swap_in
    path, model_dir = Path(path), Path(model_dir)
    tmp = fresh(path)
    with torch.device("meta"):
        plain = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if k != "_name_or_path"})
    plain.load_state_dict(state_dict, assign=True)
    plain.save_pretrained(tmp / "transformer")
    sort_headers(tmp / "transformer")
    for item in model_dir.iterdir():
        if item.name != "transformer" and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item.resolve())
    return swap_in(tmp, path)


# ---------------------------------------------------------------- the transformer, read a part at a time
class WeightFiles:
    """A diffusers model folder's weights (one safetensors file, or several named by its
    `*.safetensors.index.json`) and config, read a part at a time: `read([(key, index, shape)])` yields
    (key, tensor[index]) for each, in the file's dtype, after checking that the file holds `shape`. Each file is
    opened (mapped) once per call and closed after it, and only the bytes of the parts are read: the rows of a
    row-major tensor are one contiguous range, so a rank that reads its Shard(0) rows touches its share of the
    file."""

    def __init__(self, folder):
        from safetensors import safe_open
        self.folder, self.open = Path(folder), safe_open
        self.config = FluxTransformer2DModel.load_config(self.folder)
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


def load_transformer(weights, device="cpu", dtype=torch.float32, prepare=None):
    """A FluxTransformer2DModel in `dtype` on `device` from `weights` (a WeightFiles, or anything with its .config
    and .read: bench/scale.py reads fake tensors), of which this process only ever holds its own part: the whole
    model in one process, its shard under FSDP2, plus one block's part in flight.

    1. built from the config on the meta device (no memory, no random init);
    2. `prepare(transformer)` may change it there and returns the module to fill: train.load_model adds the LoRA
       adapters (policy.lora.add_lora makes them real, with their seeded values) and shards it (train.shard_model:
       FSDP2's fully_shard takes meta parameters);
    3. every parameter gets memory for its local part only (to_empty: a plain tensor whole, a DTensor its local
       shard, FSDP2 and HSDP alike) and is filled block by block with the rows it holds, read and cast to its dtype
       as from_pretrained casts them. Parameters that `prepare` made real (the adapters) keep their values."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(weights.config)
        _replace_parameters(transformer, lambda p: p.to(dtype))  # FLUX keeps no module in fp32
    module = prepare(transformer) if prepare is not None else transformer
    if any(True for _ in module.buffers()):
        raise NotImplementedError("load_transformer fills parameters only, and this module has buffers")

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p
    with torch.no_grad():
        kept = {n: local(p).clone() for n, p in module.named_parameters() if not p.is_meta}
        if any(isinstance(p, DTensor) for p in module.parameters()):
            module.to_empty(device=device)  # FSDP2 re-registers its shards in its _apply
        else:
            _replace_parameters(module, lambda p: torch.empty_like(p, device=device))
        params, blocks = dict(module.named_parameters()), {}
        for name, p in params.items():
            if name in kept:
                local(p).copy_(kept.pop(name))
                continue
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements) \
                if isinstance(p, DTensor) else (p.shape, (0,) * p.dim())
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            key = name.replace(".base_layer.", ".")  # an adapted layer's own weight, as the file names it
            block = re.match(r"((single_)?transformer_blocks\.\d+\.)?", name)[0]  # '' for the root's own
            blocks.setdefault(block, {})[key] = (name, index, p.shape)
        for block in blocks.values():
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


def _tokenize(tok, texts, n: int) -> torch.Tensor:
    """(b, n) ids, padded and truncated to n tokens like FluxPipeline; warns when a prompt is cut."""
    if max(len(ids) for ids in tok(texts).input_ids) > n:
        warnings.warn(f"a prompt has more than {n} {type(tok).__name__} tokens: truncated, as FluxPipeline does")
    return tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def sample(policy: FluxPolicy, prompts, seeds, T: int = 16, shift: float = 3.0, batch_size: int = 64):
    """ODE (Eq. 1) samples (B, 3, H, W) in [0, 1]; sample i starts from policy.noise(1, seed seeds[i]).
    Used for sample grids and evaluation; batch_size prompts share one batched call per step."""
    sigmas, out = sigma_grid(T, shift), []
    policy.encode_prompts(prompts)  # all new prompts in one pass (it loads the text encoders)
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        x = torch.cat([policy.noise(1, torch.Generator().manual_seed(int(s))) for s in ss])  # (b, L, C)
        conds = [policy.embed(p) for p in ps]
        v = policy.velocity(Cond(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds])))
        for k in range(T):
            x = ode_step(x, v(x, sigmas[k].expand(len(ps))), sigmas[k], sigmas[k + 1])
        out.append(policy.decode(x))
    return torch.cat(out)


# ---------------------------------------------------------------- the folder, checked from its files alone
def folder_problem(root) -> str:
    """'' when `root` is a FLUX folder this module loads, else what is missing from it (read from its files; nothing
    is loaded): model_index.json, the parts it names, the transformer's config.json and its safetensors weights."""
    root = Path(root)
    if not (root / "model_index.json").is_file():
        return f"{'has no model_index.json' if root.is_dir() else 'does not exist'}: expected a local diffusers " \
               f"FLUX folder as FluxPipeline.save_pretrained writes it ({LAYOUT})"
    try:
        index = json.loads((root / "model_index.json").read_text())
    except ValueError as e:
        return f"model_index.json is not JSON ({e})"
    has_vae = (index.get("vae") or [None])[0] is not None  # no entry, null or [null, null]
    for sub in ("transformer",) + ("vae",) * has_vae + ENCODER_PARTS:
        if not (root / sub).is_dir():
            return f"has no {sub}/ subfolder: a FLUX folder as FluxPipeline.save_pretrained writes it holds {LAYOUT}"
    for part in ("transformer",) + ("vae",) * has_vae:
        if not (root / part / "config.json").is_file():
            return f"{part}/ has no config.json"
    if not list((root / "transformer").glob("*.safetensors")):
        return "transformer/ holds no *.safetensors weights (diffusers' save_pretrained format)"
    for index in sorted((root / "transformer").glob("*.safetensors.index.json")):  # a sharded transformer
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"transformer/{index.name} is damaged (not a JSON weight_map)"
        if missing := [f for f in named if not (root / "transformer" / f).is_file()]:
            return f"transformer/{missing[0]} is missing (transformer/{index.name} names it)"
    for file in sorted((root / "transformer").glob("*.safetensors")):
        if why := safetensors_problem(file):
            return f"transformer/{file.name}: {why}"
    return ""


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses a longer header


def safetensors_problem(path) -> str:
    """'' when `path` is a whole safetensors file, else what is wrong in a few words ("truncated: 1234 of 5678 bytes",
    "not a safetensors file"). Only the header is read: its 8-byte length, its JSON, and the end of the last tensor's
    data, which must be the end of the file (the library refuses a file of another length)."""
    import struct
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


def transformer_config(root) -> dict:
    return json.loads((Path(root) / "transformer" / "config.json").read_text())


def size_multiple(root) -> int:
    """Height and width must be multiples of this: 2 f (2x2 patches of latent cells of f pixels: 16 with FLUX's VAE,
    2 in pixel space)."""
    root = Path(root)
    index = json.loads((root / "model_index.json").read_text())
    if (index.get("vae") or [None])[0] is None:
        return 2
    return 2 * 2 ** (len(json.loads((root / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
