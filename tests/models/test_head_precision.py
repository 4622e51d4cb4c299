"""The prototype layer's fp32 logits under bf16 autocast (``dino_fast.models.head``): at the
teacher temperature 0.04 a bf16 logit would be rounded by up to 0.05 nats; these are exact to
fp32 accumulation, with autocast's bf16 gradients."""
import torch
import torch.nn.functional as F

from dino_fast.models.head import DINOHead, WeightNormLinear

TEACHER_TEMP = 0.04
BOTTLENECK = 256
# fp32 accumulation of 256 products of two unit vectors errs by at most 256 * 2^-24 (the sum of
# |w_i x_i| is at most 1); divided by the temperature that is 3.8e-4 nats.
FP32_BOUND = BOTTLENECK * 2**-24 / TEACHER_TEMP


def aligned_layer(x: torch.Tensor, out: int = 512) -> WeightNormLinear:
    """A prototype layer whose first rows lie near the unit vectors ``x``: logits near 1, as
    after training (a fresh layer's logits are near 0, where rounding hides)."""
    torch.manual_seed(1)
    layer = WeightNormLinear(BOTTLENECK, out)
    with torch.no_grad():
        layer.weight_g.fill_(1)
        layer.weight_v[: len(x)] = x + 0.01 * torch.randn_like(x)
    return layer


def test_bf16_autocast_logits_are_fp32_and_exact_to_accumulation():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(32, BOTTLENECK), dim=-1).bfloat16()  # the bf16 head's output
    layer = aligned_layer(x.float())
    with torch.no_grad():
        exact = F.linear(x.double(), layer.weight.bfloat16().double())  # the same bf16 values
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = layer(x)
    assert logits.dtype == torch.float32 and exact.abs().max() > 0.9
    nats = ((logits.double() - exact) / TEACHER_TEMP).abs().max().item()
    rounded = ((logits.bfloat16().double() - exact) / TEACHER_TEMP).abs().max().item()
    assert nats <= FP32_BOUND, nats
    assert rounded > 40 * FP32_BOUND  # what bf16 logits would lose (the test could fail)


def test_gradients_are_autocasts_bf16_linear_gradients():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(12, BOTTLENECK), dim=-1)
    layer = aligned_layer(x[:8])
    grad_out = torch.randn(12, 512)

    def grads(fp32_output: bool):
        inp = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(inp) if fp32_output else F.linear(inp, layer.weight)
        out.float().backward(grad_out)
        return inp.grad, layer.weight_v.grad
    (gx, gv), (want_x, want_v) = grads(True), grads(False)
    torch.testing.assert_close(gx, want_x, rtol=2e-2, atol=2e-3)  # bf16 vs its fp32 rounding
    torch.testing.assert_close(gv, want_v, rtol=2e-2, atol=2e-3)


def test_teacher_softmax_of_the_bf16_head_loses_no_precision_at_its_output():
    """The whole head: its bf16 MLP moves the logits, the output adds nothing on top; bf16
    logits would add their rounding."""
    torch.manual_seed(0)
    head = DINOHead(64, 512, hidden_dim=128, bottleneck_dim=BOTTLENECK)
    x = torch.randn(32, 64)
    with torch.no_grad():
        head.last_layer.weight_v[:32] = F.normalize(head.mlp(x), dim=-1)
        fp32 = F.log_softmax(head(x) / TEACHER_TEMP, dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x)
    assert logits.dtype == torch.float32
    ours = (F.log_softmax(logits / TEACHER_TEMP, dim=-1) - fp32).abs().max()
    bf16 = (F.log_softmax(logits.bfloat16().float() / TEACHER_TEMP, dim=-1) - fp32).abs().max()
    assert ours < bf16, (ours, bf16)
