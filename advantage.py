"""Eqs. 8 and 11 of G2RPO: step-aware, multi-granularity, multi-reward advantages.

    code        paper
    ----        -----
    R           R(x^{i,j}_{0<-k}, c): rewards, shape (..., G) with the group last
    A           A^i_k (Eq. 8) or A^{i,mix}_k (Eq. 11)
    G           group size (the last dim)
    adv_clip    adv_clip_max (5.0 in Table 4)

Eq. 8   A^i_k = (R^i_k - mean_i R^i_k) / std_i R^i_k          normalised per (prompt, k[, lam, reward])
Eq. 11  A^{i,mix}_k = sum_{lam in Lambda} A^{i,lam}_k          then summed over reward models
                                                              (optional weights), then clipped.
        The paper sums the granularities; lambda_weights w_lam (an ablation, not the paper's) gives
        sum_lam w_lam A^{i,lam}_k instead.

The std is the unbiased (G - 1) estimator, as torch.std and the reference code use. A group whose
rewards are all equal carries no preference: its advantages are exactly 0 (never NaN or 0/0 noise).
"""
import torch


def group_advantage(R: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 8 over the last dim. R: (..., G) -> (..., G) with zero mean, unit (unbiased) std."""
    if R.shape[-1] < 2:
        raise ValueError(f"a group needs G >= 2 members to be normalised, got shape {tuple(R.shape)}")
    R = R.double()  # fp64: rewards like 16.01 vs 16.02 keep their spread exactly; cheap at (..., G)
    mean = R.mean(-1, keepdim=True)
    std = R.std(-1, keepdim=True)
    # degenerate group: a spread at the level of float rounding of the rewards -> no signal
    flat = std <= eps * mean.abs()
    return torch.where(flat, torch.zeros_like(R), (R - mean) / torch.where(flat, 1.0, std)).float()


def mixed_advantage(R: torch.Tensor, weights=None, adv_clip: float = 5.0, lambda_weights=None) -> torch.Tensor:
    """Eq. 11 plus the multi-reward sum and clipping.

    R: (n_rewards, n_lambda, ..., G), e.g. (n_rewards, |Lambda|, |M|, G) for one prompt.
    Each (reward, lam, ...) group is normalised on its own (Eq. 8), then summed over lam
    (Eq. 11) and over rewards (weighted if `weights` is given), then clipped to +-adv_clip.
    Returns (..., G).
    """
    if R.ndim < 3:
        raise ValueError(f"R must be (n_rewards, n_lambda, ..., G), got shape {tuple(R.shape)}")
    A = group_advantage(R)  # (n_rewards, n_lambda, ..., G)
    if lambda_weights is not None:  # weighted fusion instead of Eq. 11's plain sum
        wl = torch.as_tensor(lambda_weights, dtype=A.dtype, device=A.device)
        if wl.shape != (R.shape[1],):
            raise ValueError(f"need one weight per granularity ({R.shape[1]}), got {tuple(wl.shape)}")
        A = A * wl.reshape((1, -1) + (1,) * (A.ndim - 2))
    A = A.sum(1)  # Eq. 11: over granularities
    if weights is not None:
        w = torch.as_tensor(weights, dtype=A.dtype, device=A.device)
        if w.shape != (R.shape[0],):
            raise ValueError(f"need one weight per reward model ({R.shape[0]}), got {tuple(w.shape)}")
        A = A * w.reshape((-1,) + (1,) * (A.ndim - 1))
    return A.sum(0).clamp(-adv_clip, adv_clip)  # over reward models, then clip
