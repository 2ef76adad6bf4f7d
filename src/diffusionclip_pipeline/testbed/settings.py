"""The `finetune` / `edit` settings the test-bed world needs, where they differ from the library defaults.

Chosen by measurement on the test-bed with the shipped (second) CLIP: four colour edits, one per source colour
(red -> blue circle, green -> yellow triangle, blue -> red square, yellow -> green circle), 16 training and 32
held-out images each, seed 5 (the README reports seed 0 on 64 images). Mean success over the four edits:
global CLIP weight 1.0 -> 45 %, 0.5 -> 53 %, 0 -> 40 % (the directional term alone turned yellow into red for
"yellow -> green": moving away from the source colour satisfies it too); L1 weight 0.6 -> 38 %; adding the sparse
change penalty at 0.5 on top of global 0.5 -> 62 % (the best); t0 400 -> 51 %, t0 300 -> 45 %; CLIP views with
pixel noise 0.1 -> 57 %. 15 epochs and L1 0.3 come from the earlier red -> blue measurements; t0 500 and the other
settings are the library defaults.
"""

RECOMMENDED_FINETUNE: dict = dict(
    global_clip_loss_weight=0.5, sparse_loss_weight=0.5, num_epochs=15, l1_loss_weight=0.3
)
RECOMMENDED_EDIT: dict = dict()
