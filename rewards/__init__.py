"""The reward models R(x_0, c) of Eqs. 4, 8 and 11, by name: one registry for training and evaluation.

    clip.py           HPS-v2.1, CLIP score, PickScore (open_clip / transformers CLIP)
    imagereward.py    ImageReward (BLIP) without its package
    unifiedreward.py  UnifiedReward judge (Qwen-VL), HTTP or local

Every reward is an object with a `name` and `score(images, prompts) -> (B,) float32` on images
(B, 3, H, W) in [0, 1]. `load_rewards("hps+clip", hps_checkpoint=..., clip_model=...)` returns one
object per name: the advantages are normalised per reward and then summed (Eq. 11).

REWARDS says, per name, the title of its table column, its display scale, the options it takes (an
option is a command-line flag without '--'; RewardOptions holds those of the command line, with
their help), which of them it needs and where its files come from; `needs` checks given options
against it. Names starting with 'toy' are the small world's rule-based rewards (toy/rewards.py). A reward that can
score only some prompts has a rule (Spec.rule: toy-adherence parses the small world's grammar), and
`prompt_errors` checks a prompt list against the rewards of a spec before any work.
ImageReward, UnifiedReward and the toy world are imported only when one of their rewards is loaded.
"""
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass



def _lazy(module: str, loader: str):
    """module.loader (a module of this package), imported on the first call."""
    return lambda **kw: getattr(importlib.import_module(module, __package__), loader)(**kw)


CLIP_NAMES = ("OPENAI_MEAN", "OPENAI_STD", "OpenClipReward", "PickScore", "preprocess", "resize_longest_pad", "load_hps",
              "load_clip", "load_pickscore")


def __getattr__(name: str):
    """rewards.preprocess etc. (clip.py's), imported on first use: clip.py imports open_clip and torchvision, which a
    run of other rewards (the small world's) does not need (0.6 s of every process's start)."""
    if name in CLIP_NAMES:
        return getattr(importlib.import_module(".clip", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Spec:
    """One reward of the registry."""
    title: str  # column title in Tables 1 and 3
    load: Callable  # load(**keywords, device=..., [dtype=...]) -> the reward object
    options: dict  # option -> keyword of load
    needs: tuple = ()  # alternatives: all options of one of them must be given (() = nothing needed)
    files: tuple = ()  # options naming a file or folder: one given but absent is an error
    origin: str = ""  # where the files come from
    scale: float = 1.0  # tables show scores * scale
    rule: Callable = None  # rule(prompt) raises ValueError for a prompt the reward cannot score (None: any prompt)
    takes: str = ""  # the prompts it scores, for the message of prompt_errors


REWARDS = {  # in the order of Table 1's columns
    "hps": Spec("HPS-v2.1", _lazy(".clip", "load_hps"), {"hps_checkpoint": "checkpoint", "hps_arch": "arch"},
                (("hps_checkpoint",),), ("hps_checkpoint",),
                "HPS_v2.1_compressed.pt from the HPSv2 release (Hugging Face repo xswu/HPSv2)"),
    "clip": Spec("CLIP", _lazy(".clip", "load_clip"), {"clip_model": "model_path", "clip_arch": "arch"}, (("clip_model",),),
                 ("clip_model",), "the DFN5B CLIP folder (Hugging Face repo apple/DFN5B-CLIP-ViT-H-14-378)"),
    "pickscore": Spec("PickScore", _lazy(".clip", "load_pickscore"),
                      {"pickscore_model": "model_path", "pickscore_processor": "processor_path"},
                      (("pickscore_model", "pickscore_processor"),), ("pickscore_model", "pickscore_processor"),
                      "the PickScore_v1 folder (Hugging Face repo yuvalkirstain/PickScore_v1) and the "
                      "CLIP-ViT-H-14 processor folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
                      scale=0.01),  # Table 1 prints PickScore (logit_scale.exp() * cos) / 100
    "imagereward": Spec("ImageReward", _lazy(".imagereward", "load"),
                        {"imagereward_checkpoint": "checkpoint", "imagereward_tokenizer": "tokenizer",
                         "imagereward_med_config": "med_config"},
                        (("imagereward_checkpoint", "imagereward_tokenizer"),),
                        ("imagereward_checkpoint", "imagereward_tokenizer", "imagereward_med_config"),
                        "ImageReward.pt and med_config.json from the Hugging Face repo THUDM/ImageReward, and a "
                        "bert-base-uncased tokenizer folder (google-bert/bert-base-uncased)"),
    "unifiedreward": Spec("UnifiedReward", _lazy(".unifiedreward", "load"),
                          {"unifiedreward_url": "url", "unifiedreward_model": "model", "unifiedreward_local": "local",
                           "unifiedreward_workers": "workers", "unifiedreward_strict": "strict"},
                          (("unifiedreward_url",), ("unifiedreward_local",)), ("unifiedreward_local",),
                          "a server of CodeGoat24/UnifiedReward-qwen-7b with an OpenAI-compatible API (e.g. "
                          "`vllm serve CodeGoat24/UnifiedReward-qwen-7b`) or a local folder holding that model"),
}
OPTIONS = {key for spec in REWARDS.values() for key in spec.options}


@dataclass
class RewardOptions:
    """Files of the reward models; REWARDS says which reward needs which (training refuses a missing one,
    evaluation skips that metric with one line saying why)."""
    hps_checkpoint: str = ""  # HPS_v2.1_compressed.pt
    clip_model: str = ""  # open_clip DFN5B-CLIP-ViT-H-14-378 folder (or file)
    pickscore_model: str = ""  # PickScore_v1 folder
    pickscore_processor: str = ""  # CLIP-ViT-H-14-laion2B-s32B-b79K processor folder
    imagereward_checkpoint: str = ""  # ImageReward.pt
    imagereward_tokenizer: str = ""  # bert-base-uncased tokenizer folder
    imagereward_med_config: str = ""  # med_config.json (optional: head count, LayerNorm eps)
    unifiedreward_url: str = ""  # OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1
    unifiedreward_model: str = ""  # the served model name (empty: the server's only model)
    unifiedreward_local: str = ""  # or a local UnifiedReward-qwen-* folder (transformers)
    unifiedreward_workers: int = 8  # concurrent requests per rank (local: images per generate call)


TOY_PROMPTED = ("toy-adherence",)  # the toy rewards that parse their prompts (toy/rewards.py); the others ignore them
TOY_TAKES = "the small world's prompts 'a <colour> <shape> <place>' (toy/world.py), e.g. 'a red circle on the left'"


def lookup(name: str) -> Spec:
    """The Spec of reward `name`; a 'toy-...' name imports the small world's rewards (ValueError if unknown)."""
    if name.startswith("toy"):
        toy = importlib.import_module("toy.rewards")
        if name not in toy.TOY_REWARDS:
            raise ValueError(f"unknown toy reward {name!r}; valid: {sorted(toy.TOY_REWARDS)}")
        rule = {"rule": toy.parse, "takes": TOY_TAKES} if name in TOY_PROMPTED else {}
        return Spec(name, lambda **_: toy.TOY_REWARDS[name](), {}, **rule)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: {sorted(REWARDS)} or a 'toy-...' name (toy/rewards.py)")
    return REWARDS[name]


def needs(name: str, options: dict) -> str:
    """'' when `options` hold what reward `name` needs, else what it needs ('--a and --b (origin)').
    A file or folder that is given but does not exist raises FileNotFoundError."""
    spec, flag = lookup(name), lambda key: "--" + key.replace("_", "-")
    for key in spec.files:
        if options.get(key) and not os.path.exists(options[key]):
            raise FileNotFoundError(f"reward '{name}': {flag(key)} {options[key]}: no such file or folder; "
                                    f"expected {spec.origin}")
    if not spec.needs or any(all(options.get(key) for key in alt) for alt in spec.needs):
        return ""
    return " or ".join(" and ".join(map(flag, alt)) for alt in spec.needs) + f" ({spec.origin})"


def spec_names(spec: str) -> list:
    """'hps+clip' -> ['hps', 'clip']; ValueError for an empty name or a name given twice."""
    names = [n.strip() for n in spec.split("+")]
    if "" in names or len(set(names)) != len(names):
        raise ValueError(f"{spec!r}: give distinct reward names joined by '+', e.g. hps+clip (a name is empty "
                         "or given twice)")
    return names


def reward_spec_errors(spec: str, options: dict) -> list:
    """One line per problem of a reward spec ('hps+clip') with the given options, without loading anything:
    an empty or repeated name, an unknown one, a file it needs that is not given or does not exist."""
    try:
        names = spec_names(spec)
    except ValueError as e:
        return [str(e)]
    errors = []
    for name in names:
        try:
            if missing := needs(name, options):
                errors.append(f"{name} needs {missing}")
        except (ValueError, FileNotFoundError) as e:
            errors.append(str(e))
    return errors


def prompt_errors(spec: str, prompts: list, source: str = "--prompts", lines: list = None) -> list:
    """One line per reward of `spec` ('toy-adherence+toy-clean') that cannot score some of `prompts` (it would
    raise mid-run), found before any work: how many, the first one (lines[i], its line in the file, else its
    position), what the reward scores. Each line starts with `source`, e.g. '--prompts p.txt'. Only rewards
    with a rule refuse prompts (today the small world's toy-adherence); an invalid spec gives [] (see
    reward_spec_errors). Nothing is loaded."""
    from data.prompts import short
    try:
        specs = [(name, lookup(name)) for name in spec_names(spec)]
    except ValueError:
        return []
    errors = []
    for name, entry in specs:
        refused = [i for i, p in enumerate(prompts) if entry.rule and not _follows(entry.rule, p)]
        if refused:
            i = refused[0]
            errors.append(f"{source}: {len(refused):,} of {len(prompts):,} prompts are not what {name} scores, "
                          f"{entry.takes}; the first, {f'line {lines[i]}' if lines else f'prompt {i + 1}'}: "
                          f"{short(prompts[i])}")
    return errors


def _follows(rule: Callable, prompt: str) -> bool:
    """Whether `rule` takes `prompt` (rule raises ValueError for one it refuses)."""
    try:
        rule(prompt)
    except ValueError:
        return False
    return True


def load_rewards(spec: str, device="cpu", dtype=None, **options) -> list:
    """'hps+clip' -> [hps reward, clip reward]: one object per '+'-separated name, in order.
    options: the keys of OPTIONS, e.g. hps_checkpoint, clip_model, pickscore_model, pickscore_processor
    (None or '' = not given). dtype: None = each reward's own default (float32 for the CLIP family)."""
    if set(options) - OPTIONS:
        raise TypeError(f"unknown reward option(s) {sorted(set(options) - OPTIONS)}; valid: {sorted(OPTIONS)}")
    rewards = []
    for name in spec_names(spec):
        entry = lookup(name)
        if missing := needs(name, options):
            raise ValueError(f"reward '{name}' needs {missing}")
        kwargs = {arg: options[key] for key, arg in entry.options.items() if options.get(key) not in (None, "")}
        rewards.append(entry.load(**kwargs, device=device, **({} if dtype is None else {"dtype": dtype})))
    return rewards
