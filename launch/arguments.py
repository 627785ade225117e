"""train.py's arguments checked before any work: every problem in one line each, printed once by rank 0, with
nothing written. The flags of the chosen --algo only; the files they name (prompt files, the reward models' files,
the model folder) read and checked; the flags that reach diffusers and peft against the model's own config files;
the run folder against the settings (launch/run_folder.py).
"""
import hashlib
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from baselines.grpo import ALGOS as BASELINES
from data.prompts import numbered_prompts, prompt_file_errors, read_prompts
from launch import run_folder
from policy.families import family_problem
from report.files import folder_errors
from rewards import prompt_errors, reward_spec_errors, spec_names
from rollout import default_sde_steps


class Errors(list):
    """One line per problem."""

    def need(self, ok, message):
        if not ok:
            self.append(message)


def sde_steps(a) -> list:
    """M: the --sde-steps given, or the paper's first half of the grid."""
    return list(a.sde_steps) or default_sde_steps(a.T)


def plan_errors(a) -> list:
    """The flags of the chosen --algo's sampling plan: a baseline's, or G2RPO's (Lambda, M and its variants)."""
    errors = Errors()
    need = errors.need
    if a.algo in BASELINES:
        need(a.Lambda == (1,) and not a.sde_steps, f"--algo {a.algo} scores one image per trajectory and plans its "
             "own SDE steps: drop --Lambda and --sde-steps")
        need(not a.sde_steps_per_iteration and not a.lambda_weights, f"--algo {a.algo}: --sde-steps-per-iteration "
             "and --lambda-weights are G2RPO's options")
        need(a.algo != "dancegrpo" or 0 < a.train_fraction <= 1, f"--train-fraction {a.train_fraction}: in (0, 1]")
        need(a.algo != "mixgrpo" or 1 <= a.window <= a.T, f"--window {a.window}: must be in [1, T = {a.T}]")
        need(a.algo != "mixgrpo" or a.window_shift_every >= 1, "--window-shift-every: must be >= 1")
    else:
        need(a.Lambda and min(a.Lambda) >= 1 and len(set(a.Lambda)) == len(a.Lambda),
             f"--Lambda {' '.join(map(str, a.Lambda))}: give distinct integers >= 1, e.g. --Lambda 1 2 3")
        M = sde_steps(a)
        need(all(0 <= k < a.T for k in M) and len(set(M)) == len(M), f"--sde-steps {' '.join(map(str, a.sde_steps))}"
             f": distinct grid indices in [0, {a.T - 1}] for T={a.T}")
        need(a.algo != "g2rpo-no-mgai" or a.Lambda == (1,), "--algo g2rpo-no-mgai is G2RPO with Lambda = {1}; "
             "drop --Lambda")
        need(0 <= a.sde_steps_per_iteration <= len(M), f"--sde-steps-per-iteration {a.sde_steps_per_iteration}: "
             f"in [0, |M| = {len(M)}] (0: all of M)")
        need(not a.lambda_weights or len(a.lambda_weights) == len(a.Lambda), f"--lambda-weights: one weight per "
             f"granularity of --Lambda {' '.join(map(str, a.Lambda))}")
    return errors


def guard_errors(a) -> list:
    """The reward-hacking guard's flags (--probe-every)."""
    errors = [] if math.isfinite(a.probe_tolerance) and a.probe_tolerance >= 0 else \
        [f"--probe-tolerance {a.probe_tolerance}: must be >= 0"]
    if a.model and not a.probe_prompts:
        errors.append("--probe-every with --model needs --probe-prompts FILE (held-out prompts)")
    errors += prompt_file_checks(a.probe_prompts, "--probe-prompts", a.reward, a.probe_rewards) if a.probe_prompts else []
    if a.probe_rewards:
        spec = [f"--probe-rewards {e}" for e in reward_spec_errors(a.probe_rewards, asdict(a.rewards))]
        if not spec and not reward_spec_errors(a.reward, asdict(a.rewards)):
            both = set(spec_names(a.probe_rewards)) & set(spec_names(a.reward))
            spec += [f"--probe-rewards {'+'.join(sorted(both))}: trained on already (the trained reward is always "
                     "probed); name rewards NOT trained on"] * bool(both)
        errors += spec
    return errors


def prompt_file_checks(path: str, flag: str, *specs: str) -> list:
    """The prompt file given with `flag` (data/prompts.py says what is read), then its prompts against what the
    rewards of `specs` can score (rewards.prompt_errors: the small world's grammar for toy-adherence)."""
    if errors := prompt_file_errors(path, flag):
        return errors
    lines, prompts = zip(*numbered_prompts(path))
    return [e for spec in specs if spec for e in prompt_errors(spec, list(prompts), f"{flag} {path}", list(lines))]


def check_args(a):
    """Stop with one clear line per problem before any work (the flags of the chosen --algo only)."""
    errors = Errors()
    need = errors.need
    need(a.G >= 2, f"--G {a.G}: the group needs at least 2 members to normalise advantages")
    need(a.T >= 2, f"--T {a.T}: need at least 2 sampling steps")
    need(a.eta > 0, f"--eta {a.eta}: must be > 0 (a step without noise has no log-probability to train)")
    need(math.isfinite(a.shift) and a.shift >= 0, f"--shift {a.shift}: must be > 0 (0: the model family's schedule)")
    need(math.isfinite(a.guidance) and a.guidance >= 0, f"--guidance {a.guidance}: must be a finite number >= 0 (0: the "
         "model family's scale)")
    for flag, val in (("lr", a.lr), ("clip-range", a.clip_range), ("adv-clip", a.adv_clip),
                      ("max-grad-norm", a.max_grad_norm)):
        need(math.isfinite(val) and val > 0, f"--{flag} {val}: must be a finite number > 0")
    need(a.clip_range < 1, f"--clip-range {a.clip_range}: must be < 1 (the ratio is clipped to [1 - eps, 1 + eps])")
    need(math.isfinite(a.weight_decay) and a.weight_decay >= 0, f"--weight-decay {a.weight_decay}: must be >= 0")
    need(math.isfinite(a.lora_alpha) and a.lora_alpha >= 0, f"--lora-alpha {a.lora_alpha}: must be >= 0 (0: = rank)")
    for flag, val, low in (("iterations", a.iterations, 1), ("prompts-per-rank", a.prompts_per_rank, 1),
                           ("checkpoint-every", a.checkpoint_every, 0), ("keep-checkpoints", a.keep_checkpoints, 1),
                           ("max-skipped", a.max_skipped, 1), ("num-samples", a.num_samples, 0),
                           ("height", a.height, 0), ("width", a.width, 0), ("lora-rank", a.lora_rank, 0),
                           ("probe-every", a.probe_every, 0), ("probe-seeds", a.probe_seeds, 1),
                           ("probe-max-prompts", a.probe_max_prompts, 0),
                           ("probe-patience", a.probe_patience, 0)):
        need(val >= low, f"--{flag} {val}: must be >= {low}")
    errors += plan_errors(a)
    need(math.isfinite(a.collective_timeout) and a.collective_timeout >= 1, f"--collective-timeout "
         f"{a.collective_timeout}: minutes, >= 1 (it must outlast rank 0's longest lone step: the export)")
    need(a.device in ("", "cpu", "cuda"), f"--device {a.device}: cuda or cpu (empty: cuda if available; torchrun "
         "gives each rank its own GPU)")
    need(a.rescore_batch >= 0, f"--rescore-batch {a.rescore_batch}: must be >= 0 (0: all trained steps in one pass)")
    need(not a.step_per_k or a.rescore_batch == 1, "--step-per-k steps the optimizer after every k: it needs "
         "--rescore-batch 1")
    if a.model and (why := family_problem(a.model)):  # model_index.json: the family, before any other file is read
        errors.append(f"--model {a.model}: {why}")
    need(not a.model or a.prompts, "--prompts FILE is required with --model (one prompt per line)")
    errors += prompt_file_checks(a.prompts, "--prompts", a.reward) if a.prompts else []
    errors += [f"--reward {e}" for e in reward_spec_errors(a.reward, asdict(a.rewards))]
    errors += guard_errors(a) if a.probe_every else []
    if errors:
        raise SystemExit("train.py: invalid arguments:\n  " + "\n  ".join(errors))


def run_settings(a, world: int) -> dict:
    """What args.json records and a --resume must match (report/run_folder.DEFINING): the arguments, the world size,
    and digests of what --model and the prompt files hold (the same path with other content is another run)."""
    from policy.weights import fingerprint_files

    def digest(path):
        return hashlib.sha256("\n".join(read_prompts(path)).encode()).hexdigest()[:16] if path else ""
    return {**asdict(a), "world_size": world, "prompts_digest": digest(a.prompts),
            "probe_prompts_digest": digest(a.probe_prompts),
            "model_digest": fingerprint_files([Path(a.model) / "transformer"])[:16] if a.model else ""}


def check_all(a, is_main: bool):
    """Every problem with the arguments, the model folder or the run folder, before any work (nothing is written);
    printed once, by rank 0."""
    try:
        check_args(a)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        errors = [] if a.replicas >= 1 and world % a.replicas == 0 else [
            f"--replicas {a.replicas}: must divide the world size {world} (e.g. 2 for 2 nodes x 8 GPUs: shard within "
            "a node, replicate across nodes)"]
        errors += model_errors(a) + folder_errors(a.out, "--out")
        if a.model and Path(a.model).resolve() in (Path(a.out).resolve(), *Path(a.out).resolve().parents):
            errors.append(f"--out {a.out} is inside --model {a.model}: the run would write into the model folder; give "
                          "another --out")
        if not errors:
            errors += run_folder.ownership_errors(Path(a.out), run_settings(a, world), a.resume, a.overwrite)
        if errors:
            raise SystemExit("train.py: " + "\n  ".join(errors))
    except SystemExit as e:
        if not is_main:  # every rank found the same: rank 0 says it, and must not be ended by torchrun first
            time.sleep(2)
        raise SystemExit(e.code if is_main else 1) from None


def model_errors(a) -> list:
    """The flags that reach diffusers and peft, against the model's own config files (read, not loaded): its family
    (model_index.json), the image size against the latent grid's multiple, the LoRA targets against the
    transformer's module names."""
    from policy.families import family_of, folder_problem, transformer_config
    from policy.flux import FluxPolicy
    from policy.lora import target_errors
    if a.model and (why := folder_problem(a.model)):
        return [f"--model {a.model}: {why}"]
    family = family_of(a.model) if a.model else FluxPolicy  # the small world is a FLUX
    multiple = family.size_multiple(a.model) if a.model else 2  # the small world: pixel space, 2x2 patches
    errors = [f"--{flag} {v}: must be a multiple of {multiple} for this model (2x2 patches of its latent cells), e.g. "
              f"{max(multiple, v // multiple * multiple)}" for flag, v in (("height", a.height), ("width", a.width))
              if v % multiple]
    if a.model and not errors:  # the folder's g2rpo.json, whose sizes and length would otherwise fail after loading
        try:
            family.options(a.model, height=a.height, width=a.width, guidance=a.guidance)
        except ValueError as e:
            errors.append(f"--model {a.model}: {e}")
    if a.lora_rank:
        if a.model:
            config = transformer_config(a.model)
        else:
            import toy
            config = dict(toy.build(toy.ToyConfig(), seed=0).transformer.config)
        errors += target_errors(config, a.lora_targets or family.LORA_TARGETS, family.TRANSFORMER)
        import diffusers
        if not hasattr(getattr(diffusers, family.PIPELINE, None), "save_lora_weights"):  # the export's format
            errors.append(f"--lora-rank: diffusers {diffusers.__version__} has no {family.PIPELINE}.save_lora_weights "
                          "to export the adapter with: train without --lora-rank, or use a diffusers that has it")
    return errors
