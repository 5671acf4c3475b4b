"""The official Mug head written out with its full 4-D tensors, the reference that tests/test_mug.py and
tests/test_mug_train.py compare `stanvid.mug_similarity` (chunked) against. Imported as `from mugkit import ...`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mug_reference(tokens, mask, frames, tau, mode):
    """The official head's computation, written out with the full (N, B, L, T) and (N, B, L, D) tensors."""
    t = F.normalize(tokens, dim=-1, eps=1e-6)
    v = F.normalize(frames, dim=-1, eps=1e-6)
    m = mask.float()
    r = torch.einsum("atd,bvd->abtv", t, v) * m[:, None, :, None]
    ninf = float("-inf")
    if mode == "mug_frame_token_simple":
        t2v = (r * torch.softmax(r * tau, -1)).sum(-1)
        v2t = (r * torch.softmax(torch.where(r == 0, ninf, r) * tau, -2)).sum(-2)
        t2v = (t2v * torch.softmax(torch.where(t2v == 0, ninf, t2v) * tau, -1)).sum(-1)
        v2t = (v2t * torch.softmax(v2t * tau, -1)).sum(-1)
        return (t2v + v2t) / 2
    if mode == "mug_frame_token":
        text1 = torch.einsum("abtv,bvd->abtd", torch.softmax(r * tau, -1), v)
        t2v = torch.einsum("abtd,atd->abt", text1, t)
        video1 = torch.einsum("abtv,atd->abvd", torch.softmax(torch.where(r == 0, ninf, r) * tau, -2), t)
        v2t = torch.einsum("abvd,bvd->abv", video1, v)
        video2 = torch.einsum("abt,atd->abd", torch.softmax(torch.where(t2v == 0, ninf, t2v) * tau, -1), t)
        text2 = torch.einsum("abv,bvd->abd", torch.softmax(v2t * tau, -1), v)
        return torch.einsum("abd,abd->ab", video2, text2)
    last = (m.argmin(-1) - 1) % m.shape[1]
    x, y = r.shape[:2]
    rows = r[torch.arange(x), :, last]  # (N, B, T)
    t2v = (rows * torch.softmax(rows * tau, -1)).sum(-1)
    return (t2v + t2v) / 2
