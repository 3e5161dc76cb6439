import copy

import pytest
import torch
from torch import nn

from moco_lightning.bn import (
    AllReduceBatchNorm2d,
    AllReduceBatchNormAct2d,
    SplitBatchNorm2d,
    SplitBatchNormAct2d,
    convert_batchnorm,
    encode_shuffled,
    resolve_bn_mode,
)


def test_auto_is_shuffle_on_many_processes_and_split_on_one():
    assert resolve_bn_mode("auto", 1) == "split"
    assert resolve_bn_mode("auto", 8) == "shuffle"
    assert resolve_bn_mode("sync", 1) == "sync"
    with pytest.raises(ValueError, match="bn=group is not a BN mode of MoCo; choose one of auto, shuffle, split, sync"):
        resolve_bn_mode("group", 1)


def test_split_bn_equals_plain_bn_on_each_group_in_train_mode():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 4, 4, dtype=torch.float64)
    split = SplitBatchNorm2d(5, num_splits=3).double()
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5)
        split.bias.uniform_(-0.5, 0.5)
    references = [copy.deepcopy(nn.BatchNorm2d(5)).double() for _ in range(3)]
    for ref in references:
        ref.load_state_dict(split.state_dict())
    out = split(x)
    for s, ref in enumerate(references):  # group s holds samples s, s + 3, s + 6, ...
        torch.testing.assert_close(out[s::3], ref(x[s::3]))
    # running statistics: the mean of the groups' own running statistics
    torch.testing.assert_close(split.running_mean, torch.stack([r.running_mean for r in references]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([r.running_var for r in references]).mean(0))
    assert int(split.num_batches_tracked) == 1


def test_split_bn_is_plain_bn_in_eval_mode_and_keeps_the_state_dict_keys():
    torch.manual_seed(0)
    split, plain = SplitBatchNorm2d(3, num_splits=2), nn.BatchNorm2d(3)
    split(torch.randn(8, 3, 2, 2))  # move the running statistics
    plain.load_state_dict(split.state_dict())
    split.eval(), plain.eval()
    x = torch.randn(6, 3, 2, 2)  # any batch size in eval mode
    torch.testing.assert_close(split(x), plain(x))


def test_split_bn_gradients_match_per_group_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    split = SplitBatchNorm2d(3, num_splits=2).double()
    ref = nn.BatchNorm2d(3).double()
    (split(x) ** 2 * torch.arange(8.0, dtype=torch.float64).view(8, 1, 1, 1)).sum().backward()
    grad_split, wgrad_split = x.grad.clone(), split.weight.grad.clone()
    x.grad = None
    y = torch.empty_like(x)
    y[0::2], y[1::2] = ref(x[0::2]), ref(x[1::2])
    (y**2 * torch.arange(8.0, dtype=torch.float64).view(8, 1, 1, 1)).sum().backward()
    torch.testing.assert_close(grad_split, x.grad)
    torch.testing.assert_close(wgrad_split, ref.weight.grad)


def test_split_bn_refuses_a_batch_that_is_not_a_multiple_of_the_groups():
    with pytest.raises(ValueError, match="multiple of num_splits=4"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def test_split_bn_of_channels_last_inputs_equals_the_contiguous_path():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 5) * 3 + 1
    grad = torch.randn(8, 3, 4, 5)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        split = SplitBatchNorm2d(3, num_splits=2, momentum=0.3)
        with torch.no_grad():
            split.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            split.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        inp = x.clone(memory_format=layout).requires_grad_()
        out = split(inp)
        out.backward(grad)
        results.append((out, inp.grad, split.weight.grad, split.bias.grad, split.running_mean, split.running_var))
    for got, expected in zip(results[1], results[0], strict=True):  # the same values and gradients in either layout
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_split_bn_keeps_channels_last_activations_channels_last():
    split = SplitBatchNorm2d(4, num_splits=2)
    x = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    out = split(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert split(torch.randn(6, 4, 3, 3)).is_contiguous()  # and contiguous ones contiguous


def test_split_bn_channels_last_path_copies_no_activation():
    recorded = []

    class Copies(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                recorded.append((func, tuple(args[0].shape)))
            return out

    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with Copies():
        SplitBatchNorm2d(8, num_splits=2)(x)
    assert not [r for r in recorded if r[1] == tuple(x.shape)], recorded  # no full-size copy of the batch


def test_convert_keeps_parameters_and_buffers_and_only_swaps_plain_bn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)), nn.BatchNorm1d(4))
    weight, mean = net[1].weight, net[1].running_mean
    keys = set(net.state_dict())
    convert_batchnorm(net, "split", num_splits=2)
    assert isinstance(net[1], SplitBatchNorm2d) and isinstance(net[2][0], SplitBatchNorm2d)
    assert type(net[3]) is nn.BatchNorm1d
    assert net[1].weight is weight and net[1].running_mean is mean  # an optimizer built before keeps working
    assert set(net.state_dict()) == keys
    convert_batchnorm(net, "none")
    assert isinstance(net[1], SplitBatchNorm2d)


def test_sync_on_cpu_uses_the_all_reduce_bn_which_is_plain_bn_on_one_process():
    net = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), "sync")
    assert isinstance(net[0], AllReduceBatchNorm2d)
    plain = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(net(x), plain(x))
    torch.testing.assert_close(net[0].running_var, plain.running_var)


def test_split_mode_shuffles_the_key_batch_and_returns_it_in_order():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 1), SplitBatchNorm2d(4, num_splits=2), nn.Flatten())
    x = torch.randn(8, 3, 2, 2)
    seen = []
    encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    torch.manual_seed(1)
    out = encode_shuffled(encoder, x, "split")
    torch.manual_seed(1)
    perm = torch.randperm(8)
    assert torch.equal(seen[0], x[perm])  # the encoder saw the shuffled batch ...
    unshuffled = encoder(x[perm])[torch.argsort(perm)]
    torch.testing.assert_close(out, unshuffled)  # ... and every output row is its own sample's
    assert not torch.allclose(out, encoder(x))  # other groups than in order: other statistics


def test_split_noshuffle_has_split_groups_and_encodes_the_key_batch_in_order():
    encoder = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten()),
                                "split_noshuffle", num_splits=2)
    assert isinstance(encoder[1], SplitBatchNorm2d) and encoder[1].num_splits == 2
    x = torch.randn(8, 3, 2, 2)
    seen = []
    encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    out = encode_shuffled(encoder, x, "split_noshuffle")
    assert torch.equal(seen[0], x)  # the groups are rows 0-3 and 4-7, as for the queries
    torch.testing.assert_close(out, encoder(x))


def _bn_types(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_sync_turns_every_batchnorm_into_syncbatchnorm_on_accelerators():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(8), nn.BatchNorm1d(8))
    weight = module[1].weight
    module = convert_batchnorm(module, "sync", device_type="cuda")
    assert _bn_types(module) == ["SyncBatchNorm", "SyncBatchNorm"]
    assert module[1].weight is weight  # the same parameters, now synchronised


def test_sync_on_cpu_processes_uses_the_all_reduce_bn_for_1d_and_2d():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(8), nn.BatchNorm1d(8))
    module = convert_batchnorm(module, "sync")
    assert _bn_types(module) == ["AllReduceBatchNorm2d", "AllReduceBatchNorm1d"]


def _mobilenet() -> nn.Module:
    """A timm MobileNetV3: its BN layers are timm's BatchNormAct2d (BN, then an activation), not BatchNorm2d."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)


@pytest.mark.parametrize("mode", ["split", "sync"])
def test_timm_batchnorm_act_layers_are_converted_with_their_activation(mode):
    from timm.layers import BatchNormAct2d

    original = _mobilenet()
    before = sum(type(m) is BatchNormAct2d for m in original.modules())
    converted = convert_batchnorm(copy.deepcopy(original), mode, num_splits=2)
    kind = SplitBatchNormAct2d if mode == "split" else AllReduceBatchNormAct2d
    assert before > 0 and sum(type(m) is kind for m in converted.modules()) == before
    assert not any(type(m) is BatchNormAct2d for m in converted.modules())
    assert converted.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), original.eval()(x))  # BN, then the same activation
        original.train(), converted.train()
        # split in train mode: each group (images 0, 2 and 1, 3) normalised on its own, as the unconverted network
        groups = torch.stack([copy.deepcopy(original)(x[0::2]), copy.deepcopy(original)(x[1::2])], 1).flatten(0, 1)
        torch.testing.assert_close(converted(x), groups if mode == "split" else original(x), rtol=1e-4, atol=1e-5)


def test_sync_on_accelerators_uses_timms_conversion_for_batchnorm_act():
    from timm.layers import SyncBatchNormAct

    converted = convert_batchnorm(_mobilenet(), "sync", device_type="cuda")
    assert any(type(m) is SyncBatchNormAct for m in converted.modules())
    assert not any(type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) for m in converted.modules())
