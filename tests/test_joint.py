from dfquant.data import fmnist
from dfquant.quant.api import quantize
from dfquant.quant.joint import joint_finetune


def test_joint_ptq_lowers_distillation_loss_and_resumes(resnet20, tmp_path):
    x, _ = fmnist.load_split("A", limit=64, seed=5)
    calib = resnet20.normalize(x)
    q, _ = quantize(resnet20.model, calib, "mse", 1.58, 8, iters=0, progress=False)  # W1.58A8: ternary weights
    losses = joint_finetune(q, calib, iters=30, batch_size=32, lr=1e-4, progress=False)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    # resumable: 10 steps, then continue to 20 from the checkpoint == 20 steps in one go
    q1, _ = quantize(resnet20.model, calib, "mse", 4, 4, iters=0, progress=False)
    q2, _ = quantize(resnet20.model, calib, "mse", 4, 4, iters=0, progress=False)
    ck = tmp_path / "joint.pt"
    joint_finetune(q1, calib, iters=20, lr=1e-4, resume=ck, max_steps=10, progress=False)
    resumed = joint_finetune(q1, calib, iters=20, lr=1e-4, resume=ck, progress=False)
    straight = joint_finetune(q2, calib, iters=20, lr=1e-4, progress=False)
    assert len(resumed) == 20 and abs(resumed[-1] - straight[-1]) < 1e-3 * max(1.0, abs(straight[-1]))
