"""The `finetune` / `edit` settings the test-bed world needs (measured; see the README's test-bed section)."""

# Placeholder values while the DDPM trains; replaced by the measured ones before the weights ship.
RECOMMENDED_FINETUNE: dict = dict(
    t0=400, num_epochs=10, learning_rate=5e-4, global_clip_loss_weight=1.0, l1_loss_weight=0.6,
)  # fmt: skip
RECOMMENDED_EDIT: dict = dict(t0=400)
