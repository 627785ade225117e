"""The small CPU world: coloured shapes, a deliberately imperfect base model, rule-based rewards.

Like nanoGPT's Shakespeare, this is the small default that runs on a laptop CPU, and a leaf: the
trainer and the evaluator reach it only when no FLUX model is given (or a toy reward is named).

    world.py     images, prompts and the held-out split
    rewards.py   toy-adherence (in-domain), toy-clean and toy-shape (out-of-domain), reward_table
    model.py     the base model: tiny FLUX parts, pretraining on noisy captions, the cached folder
    __main__.py  python -m toy: pretrain once, print the rewards, write a sample grid
"""
from .model import MAX_TOKENS, WORLD_VERSION, ToyConfig, base_model, build, config_hash, encode, policy_of, pretrain, \
    save, word_tokenizers
from .rewards import TOY_REWARDS, ToyReward, adherence, analyse, clean, reward_table, shape_quality
from .world import COLOURS, COMBOS, GRID_PROMPTS, HELD_OUT, HELDOUT_PROMPTS, JITTER, PLACES, RADIUS, SHAPES, TRAIN, \
    TRAIN_PROMPTS, WORDS, parse, prompt, render, world_batch
