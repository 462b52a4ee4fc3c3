"""Statistical checks shared by tests that compare sampled distributions (spec decoding's
acceptance rule alone and inside the engine)."""

import torch


def chi_square_p_value(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Two-sample chi-square test of homogeneity; cells expected below 5 are pooled."""
    counts_a, counts_b = counts_a.double(), counts_b.double()
    total = counts_a + counts_b
    small = total < 10
    if small.any():
        counts_a = torch.cat([counts_a[~small], counts_a[small].sum().unsqueeze(0)])
        counts_b = torch.cat([counts_b[~small], counts_b[small].sum().unsqueeze(0)])
        total = counts_a + counts_b
    keep = total > 0
    counts_a, counts_b, total = counts_a[keep], counts_b[keep], total[keep]
    na, nb = counts_a.sum(), counts_b.sum()
    ea, eb = total * na / (na + nb), total * nb / (na + nb)
    stat = ((counts_a - ea) ** 2 / ea + (counts_b - eb) ** 2 / eb).sum()
    df = len(total) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))
