"""The divergences between teacher and student distributions: names, parameters and defaults.

The one home of these names: ``kdcache.config`` takes its choices and defaults from here, and
``kdcache.losses.reference.bucket_divergence`` computes them. Standard library only, so the
config (and the CLI's ``--help``) can read the table without importing torch.

    fkl   KL(t || s)                                    forward KL (LLaVA-KD's default)
    rkl   KL(s || t)                                    reverse KL
    jsd   beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s   (GKD / TRL)
    skl   KL(t || alpha t + (1 - alpha) s)              DistiLLM skew KL
    srkl  KL(s || alpha s + (1 - alpha) t)              DistiLLM skew reverse KL
    tvd   0.5 sum |t - s|                               total variation
"""

from __future__ import annotations

# Divergence -> its parameters and their defaults (the only defaults; unknown names are refused).
DIVERGENCES: dict[str, dict[str, float]] = {
    "fkl": {},
    "rkl": {},
    "jsd": {"beta": 0.5},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "tvd": {},
}
JSD_BETA = DIVERGENCES["jsd"]["beta"]
SKEW_ALPHA = DIVERGENCES["skl"]["alpha"]  # skl and srkl share it


def resolve_divergence(divergence: str, params: dict | None = None) -> dict[str, float]:
    """Validate a divergence name and its parameters -> the full parameter dict.

    Raises ValueError for an unknown divergence (listing the choices), an unknown parameter
    or one out of range (beta in [0, 1]; alpha in [0, 1)).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}: choose from {', '.join(DIVERGENCES)}")
    allowed = DIVERGENCES[divergence]
    params = dict(params or {})
    extra = sorted(set(params) - set(allowed))
    if extra:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise ValueError(f"divergence {divergence!r} takes {takes}; got unknown {extra}")
    out = {**allowed, **{k: float(v) for k, v in params.items()}}
    if "beta" in out and not 0.0 <= out["beta"] <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {out['beta']}")
    if "alpha" in out and not 0.0 <= out["alpha"] < 1.0:
        raise ValueError(f"{divergence} alpha must lie in [0, 1), got {out['alpha']}")
    return out


def divergence_params(divergence: str, *, beta: float, alpha: float) -> dict[str, float]:
    """The parameters ``divergence`` takes, picked from the config's ``jsd_beta`` (beta) and
    ``skl_alpha`` (alpha): {} for fkl, rkl, tvd; {"beta"} for jsd; {"alpha"} for skl, srkl."""
    values = {"beta": beta, "alpha": alpha}
    return {name: values[name] for name in DIVERGENCES[divergence]}
