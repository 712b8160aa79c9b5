"""Token roles and distilled position kinds: the one definition every stage shares.

A sample is ``[prompt, visual, response]`` tokens. Each *token* has a role:

    ROLE_PROMPT = 0    system / user text and template tokens (label -100)
    ROLE_VISUAL = 1    the expanded image span (label -100)
    ROLE_RESPONSE = 2  assistant answers and their end-of-turn token (label = token)

The output *at* position t predicts token t+1. A *position kind* says which outputs
are distilled (design section 1); the kinds are disjoint, tested in this order:

    KIND_RESPONSE = 2  token t+1 is a response token (it carries L_reg and L_res)
    KIND_VISUAL = 1    t is inside the image span (L_vis; the last visual output
                       predicts the first text token after the image)
    KIND_PROMPT = 0    token t+1 is a prompt token and t is not visual (Table 4 ablation)

Response is tested first: with a caption template that puts the caption right after the
image, the last visual output predicts a response token and is counted once, as response.
The relation loss uses every output inside the image span regardless (see
``visual_span``).
"""

from __future__ import annotations

import numpy as np

ROLE_PROMPT = 0
ROLE_VISUAL = 1
ROLE_RESPONSE = 2
ROLE_NAMES = {ROLE_PROMPT: "prompt", ROLE_VISUAL: "visual", ROLE_RESPONSE: "response"}

KIND_PROMPT = 0
KIND_VISUAL = 1
KIND_RESPONSE = 2
KIND_NAMES = {KIND_PROMPT: "prompt", KIND_VISUAL: "visual", KIND_RESPONSE: "response"}
KIND_CODES = {v: k for k, v in KIND_NAMES.items()}
DEFAULT_KINDS = ("visual", "response")


def parse_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"visual,response"`` -> ``("visual", "response")`` in canonical order, validated."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KIND_CODES]
    if bad or not kinds:
        raise ValueError(
            f"unknown position kind(s) {bad or kinds!r}: choose from prompt, visual, response "
            f"(e.g. --positions visual,response)"
        )
    return tuple(k for k in ("prompt", "visual", "response") if k in kinds)


def position_kinds(roles: np.ndarray) -> np.ndarray:
    """Kind code of every output position, or -1 where nothing is predicted.

    roles: uint8 [T]  ->  int8 [T]; the last position predicts nothing (-1).
    """
    roles = np.asarray(roles)
    T = roles.shape[0]
    kinds = np.full(T, -1, dtype=np.int8)
    if T < 2:
        return kinds
    nxt = roles[1:]
    cur = roles[:-1]
    k = kinds[:-1]
    k[nxt == ROLE_PROMPT] = KIND_PROMPT
    k[nxt == ROLE_VISUAL] = -1  # predicting an image placeholder token is meaningless
    k[cur == ROLE_VISUAL] = KIND_VISUAL
    k[nxt == ROLE_RESPONSE] = KIND_RESPONSE
    return kinds


def select_positions(roles: np.ndarray, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Positions to distil, sorted, and their kind codes.

    roles: uint8 [T] -> (positions int32 [P], kind codes uint8 [P]).
    """
    all_kinds = position_kinds(roles)
    wanted = np.array([KIND_CODES[k] for k in kinds], dtype=np.int8)
    pos = np.nonzero(np.isin(all_kinds, wanted))[0].astype(np.int32)
    return pos, all_kinds[pos].astype(np.uint8)


def visual_span(roles: np.ndarray) -> np.ndarray:
    """Positions inside the image span (relation loss rows): int32 [N_vis]."""
    return np.nonzero(np.asarray(roles) == ROLE_VISUAL)[0].astype(np.int32)
