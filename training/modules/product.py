"""The product layer's quadratic signals (Qu et al. 2016, "Product-based Neural Networks for User Response
Prediction", sections 3.2-3.3), over the field embeddings f_1, ..., f_F:

    inner:  p = (<f_i, f_j>)_{i<j}                                   (B, P)          O(F^2 D) a sample
    outer:  p = sum_i sum_j f_i f_j^T = f_sigma f_sigma^T,           (B, D, D) -> (B, D*D)   O(F D + D^2)
            f_sigma = sum_i f_i
    both:   concat(inner, outer)                                     (B, P + D*D)

Inner: the paper's p is the symmetric F x F matrix of <f_i, f_j>; its upper triangle i < j is kept (each pair once,
in ``pair_indices``' row-major order, as AFM's pairs), the diagonal ||f_i||^2 left out, as FM and the authors'
released code do. Outer: the outer product of every pair would be F^2 matrices of D x D; the paper's sum-pooling
sums them first, and the sum of f_i f_j^T over all (i, j) -- both orders and i = j included -- factors into the
outer product of the summed embedding, so the layer costs O(D^2) a sample, not O(F^2 D^2). Flattened row-major:
column a * D + b holds f_sigma[a] * f_sigma[b]. The layer has no parameters: the weights W_p that take p into the
first hidden layer belong to the model that reads it.

A multi-hot field arrives sum-pooled (``SparseArch``), so its f_i is the sum of its ids' vectors; a field without
ids is a zero vector, whose products are 0.

Legend: B batch size, F fields (features), D embedding dimension, P = F (F - 1) / 2 pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from training.modules.afm_attention import pair_indices

#: The product modes: inner products (IPNN), the sum-pooled outer product (OPNN), both side by side (PNN*).
PRODUCTS = ("inner", "outer", "both")


def inner_products(embeddings: torch.Tensor) -> torch.Tensor:
    """<f_i, f_j> for every field pair i < j, in ``pair_indices``' order.

    Call: ``inner_products(embeddings: Tensor (B, F, D)) -> Tensor (B, P)``.

    >>> inner_products(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]))  # (1*3 + 2*4, 1*5 + 2*6, 3*5 + 4*6)
    tensor([[11., 17., 39.]])
    """
    left, right = pair_indices(embeddings.shape[1], embeddings.device)
    gram = torch.bmm(embeddings, embeddings.transpose(1, 2))  # (B, F, F): <f_i, f_j>
    return gram[:, left, right]  # (B, P)


def outer_product(embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's sum-pooled outer product f_sigma f_sigma^T, f_sigma = sum_i f_i, flattened row-major.

    Call: ``outer_product(embeddings: Tensor (B, F, D)) -> Tensor (B, D*D)``.

    >>> outer_product(torch.tensor([[[1.0, 2.0], [3.0, -4.0]]]))  # f_sigma = (4, -2)
    tensor([[16., -8., -8.,  4.]])
    """
    f_sigma = embeddings.sum(dim=1)  # (B, D)
    outer = f_sigma.unsqueeze(2) * f_sigma.unsqueeze(1)  # (B, D, D): f_sigma f_sigma^T
    return outer.flatten(1)  # (B, D*D)


class ProductLayer(nn.Module):
    """The quadratic signals p of one product mode (no parameters).

    Args:
        num_fields: F >= 2.
        embedding_dim: D >= 1.
        product: ``inner`` (P columns), ``outer`` (D*D columns) or ``both`` (P + D*D columns, inner first).

    Raises:
        ValueError: ``product`` not one of ``PRODUCTS``, F < 2 or D < 1; in ``forward``, input not (B, F, D).

    Call: ``forward(embeddings: Tensor (B, F, D)) -> Tensor (B, out_features)``.

    >>> layer = ProductLayer(3, 2, product="both")
    >>> layer.out_features  # 3 pairs + 2*2
    7
    >>> layer(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]))  # f_sigma = (9, 12)
    tensor([[ 11.,  17.,  39.,  81., 108., 108., 144.]])
    """

    def __init__(self, num_fields: int, embedding_dim: int, product: str = "inner") -> None:
        super().__init__()
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {list(PRODUCTS)}, got {product!r}")
        if num_fields < 2 or embedding_dim < 1:
            raise ValueError(f"ProductLayer needs F >= 2 fields and D >= 1, got F={num_fields}, D={embedding_dim}")
        self.num_fields, self.embedding_dim, self.product = num_fields, embedding_dim, product

    @property
    def out_features(self) -> int:
        pairs, outer = self.num_fields * (self.num_fields - 1) // 2, self.embedding_dim ** 2
        return {"inner": pairs, "outer": outer, "both": pairs + outer}[self.product]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 3 or embeddings.shape[1:] != (self.num_fields, self.embedding_dim):
            raise ValueError(f"ProductLayer(F={self.num_fields}, D={self.embedding_dim}) takes "
                             f"(B, {self.num_fields}, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if self.product == "inner":
            return inner_products(embeddings)  # (B, P)
        if self.product == "outer":
            return outer_product(embeddings)  # (B, D*D)
        return torch.cat([inner_products(embeddings), outer_product(embeddings)], dim=1)  # (B, P + D*D)

    def extra_repr(self) -> str:
        return f"num_fields={self.num_fields}, embedding_dim={self.embedding_dim}, product={self.product!r}"
