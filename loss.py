"""Eq. 12 of G2RPO: the clipped surrogate over the SDE steps (Eqs. 5-7, 9 with A^{mix}).

    code        paper
    ----        -----
    logp        log p_theta(x^i_{k-1} | x_k, c)       current policy, shape (..., G)
    logp_old    log p_theta_old(x^i_{k-1} | x_k, c)   from the rollout, same shape
    A           A^{i,mix}_k (Eq. 11)
    ratio       r^i_k(theta) = exp(logp - logp_old)
    clip_range  epsilon (1e-4 in Table 4)
    beta, kl    beta and KL(pi_theta || pi_ref) (beta = 0 in the paper)

J = 1/G sum_i 1/|M| sum_{k in M} min(r A, clip(r, 1 - eps, 1 + eps) A); we minimise -J, the
mean over every (k, i) given. The log-probs are means over dimensions (see sde.log_prob), so the
ratio is the D-th root of the full likelihood ratio, which is why a clip range of 1e-4 is sensible.
"""
import torch


def g2rpo_loss(logp, logp_old, A, clip_range: float = 1e-4, kl=None, beta: float = 0.0):
    """Returns (loss, diagnostics). All inputs broadcast to a common shape, e.g. (|M|, G)."""
    ratio = torch.exp(logp - logp_old.detach())
    A = A.detach()
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * A
    loss = -torch.minimum(unclipped, clipped).mean()
    if beta:
        if kl is None:
            raise ValueError("beta > 0 needs the KL term: pass kl=gaussian_kl(mean, mean_ref, std)")
        loss = loss + beta * kl.mean()
    with torch.no_grad():
        drift = (ratio - 1).abs()
        diag = {
            "clip_frac": (drift > clip_range).float().mean().item(),  # ratio outside the clip range
            "ratio_drift_mean": drift.mean().item(),
            "ratio_drift_max": drift.max().item(),
        }
    return loss, diag


def gaussian_kl(mean, mean_ref, std):
    """(B,) KL between two Gaussian transitions of equal std, mean over non-batch dims (as log_prob)."""
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
