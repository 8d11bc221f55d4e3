"""Property: any configuration either trains a step with a finite loss or is refused with one ConfigError
naming the option — never a traceback from deep inside."""
import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from lit_mpdit.errors import ConfigError
from lit_mpdit.module import DiffusionModule

CONDITIONINGS = ["adaln", "shift", "scale", "rotation", "rotation+scale", "shift+rotation", "bogus", "scale+film"]


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from(["T", "Q"]),
    patch=st.sampled_from([1, 2, 3, 4, 8]),
    input_size=st.sampled_from([4, 8, 12]),
    channels=st.sampled_from([1, 3]),
    num_classes=st.sampled_from([0, 1, 5]),
    conditioning=st.sampled_from(CONDITIONINGS),
    mp=st.sampled_from(["A", "B", "C", "D", "E", "F"]),
    norm=st.sampled_from([None, "layernorm", "rmsnorm", "none", "batchnorm"]),
    precision=st.sampled_from(["fp32", "bf16"]),
)
def test_every_configuration_trains_a_step_or_is_refused_clearly(size, patch, input_size, channels, num_classes, conditioning, mp, norm, precision):
    try:
        module = DiffusionModule(
            size=f"{size}/{patch}", conditioning=conditioning, mp=mp, norm=norm,
            input_size=input_size, in_channels=channels, num_classes=num_classes,
        )  # fmt: skip
    except ConfigError as e:
        message = str(e)
        assert message.startswith("model.") and ("allowed" in message or "must" in message), message
        return
    opt = module.configure_optimizers()["optimizer"]
    x = torch.rand(2, channels, input_size, input_size) * 2 - 1
    y = torch.randint(0, num_classes + 1, (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = module.losses(x, y)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
