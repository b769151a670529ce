"""Cross-entropy over the vocabulary fused with the output projection, a few rows at a time.

The plain route materialises B·T×V logits, their log-softmax and both of their gradients — for a
50k vocabulary that is several copies of hundreds of MB per step, memory-bound work that costs as much
as the matmuls around it. Here each chunk of rows goes projection → log-sum-exp → loss, and when a
gradient is needed the chunk's softmax is turned in place into d(loss)/d(logits) and pushed straight
through the projection (into grad_h and grad_W), so only one chunk×V buffer is ever alive. The FLOPs
are the same three matmuls as autograd's; the gradient is computed in the forward pass and scaled by
the incoming gradient in backward (the loss is a scalar, so this is exact).
"""
from __future__ import annotations

import torch

IGNORE = -100


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: a chunk×V buffer of ~32 MB (CPU) / 512 MB (CUDA) float32, but never fewer than 1024
    rows — the projection's gradient is accumulated once per chunk, and thinner chunks make that
    accumulation (a V×d read and write each time) cost more than the memory it saves."""
    budget = (1 << 27) if device.type == "cuda" else (1 << 23)  # elements per chunk×V buffer
    return max(1024, budget // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
        dtype = h.dtype
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums in at least float32
        w = weight.to(dtype)
        n = h.shape[0]
        valid = labels != ignore_index
        count = valid.sum().clamp_min(1).to(acc)  # a tensor: no host sync
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        total = torch.zeros((), dtype=acc, device=h.device)
        step = _chunk_rows(weight.shape[0], h.device)
        for s in range(0, n, step):
            hs, ys, vs = h[s:s + step], safe[s:s + step], valid[s:s + step]
            z = (hs @ w.t()).to(acc)  # chunk×V logits, then reused in place
            z.sub_(z.amax(dim=-1, keepdim=True))
            target = z.gather(1, ys[:, None])
            z.exp_()
            total_exp = z.sum(dim=-1, keepdim=True)
            total += ((total_exp.log() - target).squeeze(1) * vs).sum()
            if not need_grad:
                continue
            # d(mean loss)/d(logits) = (softmax − onehot) / count on valid rows, 0 elsewhere
            scale = (vs.to(z.dtype) / count)[:, None]
            g = z.mul_(scale / total_exp)
            g.scatter_add_(1, ys[:, None], -scale)
            g = g.to(dtype)
            grad_h[s:s + step] = g @ w
            if ctx.needs_input_grad[1]:  # the projection's gradient, accumulated in ≥ float32
                if grad_w is None:
                    grad_w = (g.t() @ hs).to(acc)
                else:
                    grad_w.addmm_(g.t().to(acc), hs.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` (…×d by V×d) against `labels` (…), ignoring `ignore_index`.

    Equal to F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=ignore_index) up to
    rounding, without ever holding the full logits.
    """
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index)
