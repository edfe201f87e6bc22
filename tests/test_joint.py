import copy

from dfquant.data import fmnist
from dfquant.quant.api import quantize
from dfquant.quant.joint import joint_finetune


def test_joint_ptq_lowers_distillation_loss_and_resumes(resnet20, tmp_path):
    x, _ = fmnist.load_split("A", limit=64, seed=5)
    calib = resnet20.normalize(x)
    # the block-wise starting points range-search their activations on 32 images (the search's cost grows with
    # the images; the drop below is the same as from 64: 0.880 vs 0.878); joint PTQ itself runs on all 64
    q, _ = quantize(resnet20.model, calib[:32], "mse", 1.58, 8, iters=0, progress=False)  # W1.58A8: ternary weights
    losses = joint_finetune(q, calib, iters=30, batch_size=32, lr=1e-4, progress=False)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    # resumable: 5 steps, then continue to 10 from the checkpoint == 10 steps in one go (from one quantized model)
    q1, _ = quantize(resnet20.model, calib[:32], "mse", 4, 4, iters=0, progress=False)
    q2 = copy.deepcopy(q1)
    ck = tmp_path / "joint.pt"
    joint_finetune(q1, calib, iters=10, lr=1e-4, resume=ck, max_steps=5, progress=False)
    resumed = joint_finetune(q1, calib, iters=10, lr=1e-4, resume=ck, progress=False)
    straight = joint_finetune(q2, calib, iters=10, lr=1e-4, progress=False)
    assert len(resumed) == 10 and abs(resumed[-1] - straight[-1]) < 1e-3 * max(1.0, abs(straight[-1]))
