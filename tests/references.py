"""Reference computations several test files share, written from the definitions (never by calling the code
they check): the dense weights cut to their routes, and the per-group ridge solve calibrated fitting documents."""
from typing import List, Sequence, Tuple

import torch


def route_groups(units: Sequence[Sequence[int]], groups: int, hidden: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input group, output group) of each dense hidden unit, from an init report's units per route (-1: a new
    slot). Route r is (r, r) without the channel shuffle (``groups`` routes) and (r // groups, r % groups) with it
    (``groups ** 2`` routes); units the conversion dropped get groups -1 and -2, which no channel has."""
    in_group, out_group = torch.full((hidden,), -1), torch.full((hidden,), -2)
    for route, kept in enumerate(units):
        kept = [u for u in kept if u >= 0]
        i, j = divmod(route, groups) if len(units) > groups else (route, route)
        in_group[kept], out_group[kept] = i, j
    return in_group, out_group


@torch.no_grad()
def cut_to_routes(fc1_weights: List[torch.Tensor], fc2_weight: torch.Tensor, in_group: torch.Tensor,
                  out_group: torch.Tensor, groups: int) -> None:
    """Mask dense weights in place (linear or 1x1 conv): the fc1 rows of unit u to input group in_group[u] (an fc1
    holding several rows per unit, like GluMlp's, repeats the pattern), the fc2 column of unit u to output group
    out_group[u]."""
    hidden = len(in_group)
    for weight in fc1_weights:
        w = weight.view(weight.shape[0], -1)
        rows = in_group.repeat(w.shape[0] // hidden)
        cols = torch.arange(w.shape[1]) // (w.shape[1] // groups)
        w.mul_((rows[:, None] == cols[None, :]).to(w.dtype))
    w2 = fc2_weight.view(fc2_weight.shape[0], -1)
    outs = torch.arange(w2.shape[0]) // (w2.shape[0] // groups)
    w2.mul_((outs[:, None] == out_group[None, :]).to(w2.dtype))


def ridge_per_group(hidden: torch.Tensor, target: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per group k: [h_k, 1] theta = target_k, theta = (G + lambda I)^-1 [h_k, 1]^T target_k with G the Gram
    matrix and lambda = 1e-3 * mean(diag(G)), in float64. Returns fc2's blocks (groups, out/groups, hidden/groups)
    and its bias."""
    hidden, target = hidden.double(), target.double()
    size, out_size = hidden.shape[1] // groups, target.shape[1] // groups
    weights, biases = [], []
    for k in range(groups):
        h = torch.cat([hidden[:, k * size:(k + 1) * size], torch.ones(len(hidden), 1, dtype=torch.float64)], 1)
        gram = h.t() @ h
        theta = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(size + 1, dtype=torch.float64),
                                   h.t() @ target[:, k * out_size:(k + 1) * out_size])
        weights.append(theta[:size].t())
        biases.append(theta[size])
    return torch.stack(weights), torch.cat(biases)
