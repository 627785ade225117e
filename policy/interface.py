"""The policy v_theta(x_t, t, c) of G2RPO, written once: what the trainer, the evaluation, the guard's probes and the
simulator need of a flow-matching text-to-image model, and the parts every family shares.

A family (policy/flux.py, policy/sd3.py, policy/qwen_image.py) is one subclass of `Policy` that fills in the
declarations and the required hooks below; nothing else in the repository knows which family it runs. To add a
fourth, copy the family file nearest to yours (unpacked latents: sd3.py; packed 2x2 tokens: flux.py, qwen_image.py),
change what differs, add its pipeline's class name to policy/families.py, and hold it to its pipeline as
tests/test_sd3.py does.

    declared            meaning
    --------            -------
    PIPELINE            model_index.json's _class_name, e.g. "FluxPipeline": how a folder is recognised; its class
                        must have save_lora_weights (the LoRA export's format)
    TRANSFORMER         the diffusers transformer class (built from transformer/config.json). Its blocks (the FSDP2
                        units, read one at a time) are the items of the ModuleLists directly under its root
                        (policy.weights.blocks)
    ENCODER_PARTS       the tokenizer and text-encoder subfolders (all required; their files key the prompt cache)
    LORA_TARGETS        default --lora-targets (module-name suffixes)
    MAX_SEQUENCE_LENGTH the most text tokens max_sequence_length may ask for (512: T5)
    DEFAULTS            all four of height, width, max_sequence_length, guidance: used when neither the flags nor
                        the folder's g2rpo.json set them (`options` resolves and checks the four, nothing loaded)
    FP32_INPUTS         the transformer's keyword inputs that stay fp32 when FSDP2 casts the others to bf16 (those
                        the transformer embeds or casts itself: the timestep, the guidance)
    Cond                a dataclass of tensors, each with batch dimension 1 first: one prompt's conditioning c (any
                        dtype: embeddings in embed_dtype, masks as integers); collate batches them along dim 0
    NEGATIVE_PROMPT     None: no classifier-free guidance; else the unconditional prompt the pipeline uses

    required hook                           what it does
    -------------                           ------------
    load_vae(root, dtype) (classmethod)     the decoder, or None (pixel space)
    size_multiple(root) (classmethod)       height and width must be multiples of it (read from configs, no load)
    max_size(root) (classmethod, optional)  the largest height or width, where the transformer has one (SD3)
    encode(prompts, batch_size)             load the text encoders, yield one Cond per prompt (on the CPU, in
                                            embed_dtype), free them: a generator, so that any number of prompts
                                            streams to disk
    forward(net, x, t, cond)                ONE batched transformer call: rows x (B, ...) float32, per-row t (B,)
                                            float32 sigmas, a collated Cond of B rows -> v (B, ...) float32 on
                                            x's device, called as the pipeline calls it, and converted to sde.py's
                                            convention: x_t = (1 - t) x_0 + t eps, v = dx/dt ~ eps - x_0 (t = 1 is
                                            noise; a pipeline that runs time the other way or negates its output,
                                            as Lumina's does, is converted here). Rows keep their order.
    noise(n, generator)                     x_T (n, ...) float32 on self.device, drawn as the pipeline draws its
                                            latents; the generator is on the CPU (sampling, evaluation) or on
                                            self.device (training): diffusers' randn_tensor takes both
    decode(x0, batch_size)                  clean latents -> images (B, 3, H, W) float32 in [0, 1] on self.device

    may be overridden                       default
    -----------------                       -------
    sigmas(T, shift)                        sde.sigma_grid(T, shift or SHIFT): the (T + 1,) fp64 grid from 1 to 0;
                                            a family with its own schedule computes it for shift 0 (qwen_image.py)
    collate(rows)                           one prompt expanded to its rows, several concatenated (qwen_image.py
                                            pads prompts of different lengths)
    guide(v_uncond, v_cond)                 v_u + w (v_c - v_u) (qwen_image.py rescales it to ||v_c||)

Classifier-free guidance (NEGATIVE_PROMPT set): the policy IS the guided velocity
v = v_u + w (v_c - v_u) (`guide`, w = guidance), so that the rollout, the old and the new log-probabilities of Eq. 12
all use the same v. The unconditional and the conditional rows go into one batched transformer call (unconditional
first, as the pipelines order them): every velocity costs `rows_per_sample` = 2 transformer rows per sample.
"""
import dataclasses
import gc
import hashlib
import io
import json
import math
import warnings
from pathlib import Path

import torch

from sde import ode_step, sigma_grid


class Policy:
    """The transformer (+ VAE) held in memory; prompts encoded on demand and cached (in memory, or one .pt per prompt
    under cache_dir, keyed by a fingerprint of the encoders, the max length, the precision the encoders ran in, the
    stored dtype and the prompt)."""

    PIPELINE = ""
    TRANSFORMER = None
    ENCODER_PARTS = ()
    LORA_TARGETS = ()
    DEFAULTS = {}
    SHIFT = 3.0  # the static time shift of sigmas(T) when the family has no other schedule
    MAX_SEQUENCE_LENGTH = 512  # the most text tokens its encoder reads (T5's 512)
    FP32_INPUTS = ("timestep", "guidance")
    Cond = None
    NEGATIVE_PROMPT = None

    def __init__(self, root, transformer, vae, height, width, max_sequence_length, guidance, device="cpu",
                 dtype=torch.bfloat16, cache_dir=None, embed_dtype=None):
        self.root, self.transformer, self.vae = Path(root), transformer, vae
        self.device, self.dtype = torch.device(device), dtype
        self.embed_dtype = embed_dtype or dtype  # the prompt embeddings as stored (the precision they are used in)
        self.height, self.width = int(height), int(width)
        self.max_sequence_length, self.guidance = int(max_sequence_length), float(guidance)
        if not 0 < self.max_sequence_length <= self.MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length {max_sequence_length!r}: must be in [1, {self.MAX_SEQUENCE_LENGTH}] "
                             f"({type(self).__name__}'s text encoder)")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._memory = {}  # key -> Cond on CPU, when there is no cache_dir
        self._fingerprint = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, height=None, width=None,
                        max_sequence_length=None, guidance=None, cache_dir=None, embed_dtype=None, transformer=None):
        """Load a local diffusers folder of this family. Unset options (None, or 0) come from its g2rpo.json, else
        DEFAULTS. The transformer is read straight onto `device` in `dtype` (policy.weights.load_transformer), or
        `transformer` is used as given (train.py's: sharded before it was filled)."""
        from policy.weights import WeightFiles, load_transformer
        root = Path(path)
        if why := cls.folder_problem(root):
            raise FileNotFoundError(f"{cls.family()} model folder {root} {why}")
        opts = cls.options(root, height=height, width=width, max_sequence_length=max_sequence_length,
                           guidance=guidance)  # checked before anything is loaded
        if transformer is None:
            transformer = load_transformer(WeightFiles(root / "transformer", cls.TRANSFORMER), device, dtype).eval()
        vae = cls.load_vae(root, dtype)
        vae = vae.to(device).eval() if vae is not None else None
        return cls(root, transformer, vae, **opts, device=device, dtype=dtype, cache_dir=cache_dir,
                   embed_dtype=embed_dtype)

    OPTIONS = ("height", "width", "max_sequence_length", "guidance")

    @classmethod
    def options(cls, root, **given) -> dict:
        """The four options of a model folder, each from `given` when set (not None or 0), else from the folder's
        g2rpo.json, else DEFAULTS; checked (sizes against size_multiple, the length against MAX_SEQUENCE_LENGTH,
        guidance >= 0) from the configs alone, so that a bad g2rpo.json stops a run before its weights are read.
        Raises ValueError naming the value and where it came from."""
        extra = Path(root) / "g2rpo.json"
        saved = {}
        if extra.is_file():
            try:
                saved = json.loads(extra.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{extra} is not JSON ({e}): fix or delete it") from None
            if not isinstance(saved, dict) or set(saved) - set(cls.OPTIONS):
                raise ValueError(f"{extra} must be a JSON object with some of {', '.join(cls.OPTIONS)}; it has "
                                 f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
        opts, where = {}, {}
        for k in cls.OPTIONS:
            if given.get(k):
                opts[k], where[k] = given[k], "given"
            elif k in saved:
                opts[k], where[k] = saved[k], str(extra)
            else:
                opts[k], where[k] = cls.DEFAULTS[k], f"{cls.__name__}.DEFAULTS"

        def number(v, integer):
            return not isinstance(v, bool) and (isinstance(v, int) if integer else isinstance(v, (int, float)))
        multiple, limit = cls.size_multiple(root), cls.max_size(root)
        for k in ("height", "width"):
            if not (number(opts[k], True) and opts[k] > 0 and opts[k] % multiple == 0):
                raise ValueError(f"{k} {opts[k]!r} ({where[k]}): must be a positive multiple of {multiple} for this "
                                 "model (2x2 patches of its latent cells)")
            if limit and opts[k] > limit:
                raise ValueError(f"{k} {opts[k]} ({where[k]}): must be at most {limit} for this model (the "
                                 "transformer's position table)")
        n = opts["max_sequence_length"]
        if not (number(n, True) and 0 < n <= cls.MAX_SEQUENCE_LENGTH):
            raise ValueError(f"max_sequence_length {n!r} ({where['max_sequence_length']}): must be in "
                             f"[1, {cls.MAX_SEQUENCE_LENGTH}] ({cls.__name__}'s text encoder)")
        w = opts["guidance"]
        if not (number(w, False) and math.isfinite(w) and w >= 0):
            raise ValueError(f"guidance {w!r} ({where['guidance']}): must be a finite number >= 0")
        return opts

    @classmethod
    def family(cls) -> str:
        return cls.PIPELINE.removesuffix("Pipeline") or cls.__name__

    @classmethod
    def layout(cls) -> str:
        return "model_index.json, transformer/, vae/, " + "/, ".join(cls.ENCODER_PARTS) + "/"

    @classmethod
    def has_vae(cls, root) -> bool:
        index = json.loads((Path(root) / "model_index.json").read_text())
        return (index.get("vae") or [None])[0] is not None  # no entry, null or [null, null]

    @classmethod
    def folder_problem(cls, root) -> str:
        """'' when `root` is a folder of this family that loads, else what is missing (read from its files; nothing
        is loaded): model_index.json, the parts, the transformer's config.json and whole safetensors weights."""
        from policy.weights import weights_problem
        root = Path(root)
        if not (root / "model_index.json").is_file():
            return f"{'has no model_index.json' if root.is_dir() else 'does not exist'}: expected a local diffusers " \
                   f"folder as {cls.PIPELINE}.save_pretrained writes it ({cls.layout()})"
        try:
            has_vae = cls.has_vae(root)
        except (ValueError, AttributeError, TypeError) as e:
            return f"model_index.json is not a diffusers index ({e})"
        for sub in ("transformer",) + ("vae",) * has_vae + cls.ENCODER_PARTS:
            if not (root / sub).is_dir():
                return f"has no {sub}/ subfolder: a folder as {cls.PIPELINE}.save_pretrained writes it holds " \
                       f"{cls.layout()}"
        for part in ("transformer",) + ("vae",) * has_vae:
            if not (root / part / "config.json").is_file():
                return f"{part}/ has no config.json"
        return weights_problem(root / "transformer")

    # ---------------------------------------------------------------- the family's hooks
    @classmethod
    def load_vae(cls, root, dtype):
        raise NotImplementedError

    @classmethod
    def size_multiple(cls, root) -> int:
        """Height and width must be multiples of this (read from the folder's configs, nothing loaded)."""
        raise NotImplementedError

    @classmethod
    def max_size(cls, root) -> int:
        """The largest height or width the transformer takes (read from configs); 0: no limit (rotary positions)."""
        return 0

    def encode(self, prompts: list, batch_size: int):
        raise NotImplementedError

    def forward(self, net, x, t, cond):
        raise NotImplementedError

    def noise(self, n: int, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        raise NotImplementedError

    def sigmas(self, T: int, shift: float = 0.0) -> torch.Tensor:
        """(T + 1,) fp64 grid: sde.sigma_grid with `shift`, or with the family's SHIFT when shift is 0."""
        return sigma_grid(T, shift or self.SHIFT)

    # ---------------------------------------------------------------- the policy v_theta(x, t, c)
    @property
    def rows_per_sample(self) -> int:
        """Transformer rows per sample in every velocity: 2 under classifier-free guidance, else 1."""
        return 1 if self.NEGATIVE_PROMPT is None else 2

    def velocity(self, cond, transformer=None):
        """v(x, t) for one prompt: x (B, ...) float32, t (B,) sigmas (or a number) -> (B, ...) float32, the prompt's
        conditioning expanded to the B rows (stride 0, no copy). `transformer` defaults to self.transformer (the
        trainer passes its FSDP-wrapped module). Gradients flow under torch.enable_grad."""
        return self.rows_velocity([(cond, None)], transformer)

    def rows_velocity(self, conds: list, transformer=None):
        """v(x, t) for rows of several prompts: [(cond, rows)] in order (rows None: all of x's). Under classifier-free
        guidance the unconditional rows join the same batched call, and the guided velocity is returned."""
        net = self.transformer if transformer is None else transformer
        negative = None if self.NEGATIVE_PROMPT is None else self.embed(self.NEGATIVE_PROMPT)

        def v(x, t):
            B = x.shape[0]
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B)  # (B,)
            rows = [(c, B if n is None else n) for c, n in conds]
            if negative is None:
                return self.forward(net, x, t, self.collate(rows))
            both = self.forward(net, torch.cat([x, x]), torch.cat([t, t]),
                                self.collate([(negative, B)] + rows))
            return self.guide(*both.chunk(2))
        return v

    def collate(self, rows: list):
        """One Cond of all rows from [(cond, n)]: one prompt's fields expanded to its n rows (stride 0), several
        prompts' concatenated. A family whose fields differ in length per prompt pads them here."""
        if all(c is rows[0][0] for c, _ in rows):
            n = sum(k for _, k in rows)
            return type(rows[0][0])(**{f: t.expand(n, *t.shape[1:]) for f, t in _fields(rows[0][0])})
        names = [f for f, _ in _fields(rows[0][0])]
        return type(rows[0][0])(**{f: torch.cat([getattr(c, f).expand(n, *getattr(c, f).shape[1:]) for c, n in rows])
                                   for f in names})

    def guide(self, v_uncond, v_cond):
        """Classifier-free guidance: v_u + w (v_c - v_u)."""
        return v_uncond + self.guidance * (v_cond - v_uncond)

    # ---------------------------------------------------------------- prompt conditioning c
    def embed(self, prompt: str):
        """The conditioning of one prompt (batch 1, on self.device), encoding it first if needed. With a cache_dir
        the entry is read from disk on every call, and its stored fingerprint, max length, dtype and prompt are
        checked: a mismatch is refused."""
        key = self._key(prompt)
        if not self._has(key):
            self.encode_prompts([prompt])
        if self.cache_dir is None:
            cond = self._memory[key]
        else:
            entry = torch.load(self._path(key), map_location="cpu", weights_only=True)
            want = self._meta(prompt)
            got = {k: entry.get(k) for k in want}
            if got != want:
                raise ValueError(f"prompt cache entry {self._path(key)} was written for {got}, not {want} "
                                 "(another text encoder, length, precision or prompt): delete it to recompute")
            cond = self.Cond(**{f.name: entry[f.name] for f in dataclasses.fields(self.Cond)})
        return type(cond)(**{f: t.to(self.device) for f, t in _fields(cond)})

    @torch.no_grad()
    def encode_prompts(self, prompts, batch_size: int = 16) -> int:
        """Encode the prompts not stored yet (and the negative prompt, under guidance), store them, free the
        encoders. Returns how many were new."""
        wanted = list(prompts) + ([self.NEGATIVE_PROMPT] if self.NEGATIVE_PROMPT is not None else [])
        todo = [p for p in dict.fromkeys(wanted) if not self._has(self._key(p))]
        if not todo:
            return 0
        for p, cond in zip(todo, self.encode(todo, batch_size), strict=True):
            self._store(p, cond)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return len(todo)

    def fingerprint(self) -> str:
        """Identifies the text encoders + tokenizers cheaply (policy.weights.fingerprint_files of their folders)."""
        from policy.weights import fingerprint_files
        if self._fingerprint is None:
            self._fingerprint = fingerprint_files([self.root / part for part in self.ENCODER_PARTS])[:32]
        return self._fingerprint

    def _meta(self, prompt: str) -> dict:
        """What an entry depends on: the encoders' files, the length, the precision the encoders ran in (a LoRA run's
        bf16 base and a full run's fp32 master give other embeddings, though both store bf16), the stored dtype."""
        return {"fingerprint": self.fingerprint(), "max_sequence_length": self.max_sequence_length,
                "encoders_dtype": str(self.dtype), "dtype": str(self.embed_dtype), "prompt": prompt}

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps(list(self._meta(prompt).values())).encode()).hexdigest()

    def _has(self, key: str) -> bool:
        return key in self._memory if self.cache_dir is None else self._path(key).is_file()

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.pt"

    def _store(self, prompt: str, cond):
        if bad := [f for f, t in _fields(cond) if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] != 1]:
            raise ValueError(f"{type(self).__name__}.encode gave a Cond whose {bad} are not tensors of batch 1 (the "
                             "interface: every field a tensor with batch dimension 1 first)")
        key = self._key(prompt)
        if self.cache_dir is None:
            self._memory[key] = cond
            return
        from report.files import atomic_write
        data = io.BytesIO()  # saved to memory: the archive's root name is then fixed, not the temporary file's
        torch.save({**self._meta(prompt), **dict(_fields(cond))}, data)
        atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data.getvalue()))  # several processes share it

    # ---------------------------------------------------------------- the ODE sampler
    @torch.no_grad()
    def sample(self, prompts, seeds, T: int = 16, shift: float = 0.0, batch_size: int = 64) -> torch.Tensor:
        """ODE (Eq. 1) samples (B, 3, H, W) in [0, 1] on the grid sigmas(T, shift); sample i starts from
        noise(1, seed seeds[i]). Used for sample grids, the guard's probes and evaluation; batch_size prompts share
        one batched call per step."""
        sigmas, out = self.sigmas(T, shift), []
        self.encode_prompts(prompts)  # all new prompts in one pass (it loads the text encoders)
        for i in range(0, len(prompts), batch_size):
            ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
            x = torch.cat([self.noise(1, torch.Generator().manual_seed(int(s))) for s in ss])  # (b, ...)
            v = self.rows_velocity([(self.embed(p), 1) for p in ps])
            for k in range(T):
                x = ode_step(x, v(x, sigmas[k].expand(len(ps))), sigmas[k], sigmas[k + 1])
            out.append(self.decode(x))
        return torch.cat(out)


def _fields(cond):
    """(name, tensor) of a Cond, in its declared order."""
    return [(f.name, getattr(cond, f.name)) for f in dataclasses.fields(cond)]


def tokenize(tok, texts, n: int) -> torch.Tensor:
    """(b, n) ids, padded and truncated to n tokens as the pipelines do (CLIP and T5 tokenizers); warns when a prompt is cut."""
    if max(len(ids) for ids in tok(texts).input_ids) > n:
        warnings.warn(f"a prompt has more than {n} {type(tok).__name__} tokens: truncated, as the pipeline does")
    return tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
