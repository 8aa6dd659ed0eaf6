"""One-to-one matching of the rows of a score matrix with its columns (Hungarian assignment, scipy's
linear_sum_assignment, maximising the total score): decoder directions by cosine (evaluate.cosines),
learned against true features (ground_truth), features by activation correlation (similarity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Matching:
    """Row `rows[k]` of A matched with row `cols[k]` of B, with score `scores[k]`: min(n_a, n_b) pairs."""

    rows: np.ndarray
    cols: np.ndarray
    scores: np.ndarray

    @property
    def cosines(self) -> np.ndarray:
        """The scores of a matching by cosine (evaluate.cosines.matching)."""
        return self.scores

    def per_row(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of A's `n_rows` rows: the index of its match in B (-1 unmatched) and the score (NaN)."""
        index, score = np.full(n_rows, -1), np.full(n_rows, np.nan)
        index[self.rows], score[self.rows] = self.cols, self.scores
        return index, score

    def per_row_tensors(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_row` as torch tensors: long indices and float32 scores."""
        index, score = self.per_row(n_rows)
        return torch.as_tensor(index, dtype=torch.long), torch.as_tensor(score, dtype=torch.float32)

    def swapped(self) -> Matching:
        """The same matching seen from B."""
        return Matching(self.cols, self.rows, self.scores)


def match_rows(scores: torch.Tensor | np.ndarray) -> Matching:
    """The one-to-one matching of rows with columns that maximises the summed score."""
    from scipy.optimize import linear_sum_assignment

    matrix = scores.double().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=np.float64)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return Matching(rows, cols, matrix[rows, cols])
