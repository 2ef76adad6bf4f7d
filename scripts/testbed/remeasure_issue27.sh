#!/bin/bash
# The fourth session's re-measurements of issue 27 (docs/remeasured.md, "Fourth session"), exactly as they ran (then in
# five queues, three at a time); every run keeps its images under build/rm27/, scored afterwards with both measures by
# scripts/testbed/rescore.py. About 5 hours of one CPU thread. Run from the repository root.
set -e

# ---- issue 27 re-measurement, queue A: the edit-depth table (docs/testbed.md), seeds 3/9/11 depths, global 1.0
export OMP_NUM_THREADS=1
S=scripts/testbed/settings_search.py; I=build/rm27/img; J=build/rm27/depth.jsonl
P4="red:blue:circle green:yellow:triangle blue:red:square yellow:green:circle"
E="t500:t0=500,num_inversion_steps=40,num_inference_steps=40 t450:t0=450,num_inversion_steps=36,num_inference_steps=36 t425:t0=425,num_inversion_steps=34,num_inference_steps=34 t400:t0=400,num_inversion_steps=32,num_inference_steps=32 t350:t0=350,num_inversion_steps=28,num_inference_steps=28 t300:t0=300,num_inversion_steps=24,num_inference_steps=24 s09:t0=500,num_inversion_steps=40,num_inference_steps=40,edit_strength=0.9 s08:t0=500,num_inversion_steps=40,num_inference_steps=40,edit_strength=0.8 a100:t0=500,num_inversion_steps=40,num_inference_steps=40,adapter_min_t=100 a200:t0=500,num_inversion_steps=40,num_inference_steps=40,adapter_min_t=200 x500:t0=500,num_inversion_steps=40,num_inference_steps=40,num_fixed_point_iterations=1 x400:t0=400,num_inversion_steps=32,num_inference_steps=32,num_fixed_point_iterations=1"
python $S --kind pixel --seed 0 --num-test 64 --pairs $P4 --edits $E --tag depth --save-images $I --json $J
for s in 5 7; do python $S --kind pixel --seed $s --num-test 32 --pairs $P4 --edits $E --tag depth --save-images $I --json $J; done
E4="t500:t0=500,num_inversion_steps=40,num_inference_steps=40 t400:t0=400,num_inversion_steps=32,num_inference_steps=32 t350:t0=350,num_inversion_steps=28,num_inference_steps=28 t300:t0=300,num_inversion_steps=24,num_inference_steps=24"
for s in 3 9 11; do python $S --kind pixel --seed $s --num-test 32 --pairs red:blue:circle --edits $E4 --tag depth --save-images $I --json $J; done
E3="t500:t0=500,num_inversion_steps=40,num_inference_steps=40 t450:t0=450,num_inversion_steps=36,num_inference_steps=36 t400:t0=400,num_inversion_steps=32,num_inference_steps=32"
for s in 3 11; do python $S --kind pixel --seed $s --num-test 32 --pairs red:blue:circle --set global_clip_loss_weight=1.0 --edits $E3 --tag global1 --save-images $I --json build/rm27/global1.jsonl; done
python $S --kind pixel --seed 5 --num-test 32 --pairs green:yellow:triangle blue:red:square --set global_clip_loss_weight=1.0 --edits $E3 --tag global1 --save-images $I --json build/rm27/global1.jsonl

# ---- issue 27 re-measurement, queue B: twelve pairs from 500, previous / one CLIP / library defaults, shape edit from 500
export OMP_NUM_THREADS=1
S=scripts/testbed/settings_search.py; I=build/rm27/img
T400="t400:t0=400,num_inversion_steps=32,num_inference_steps=32"
T500="t500:t0=500,num_inversion_steps=40,num_inference_steps=40"
PREV='l1_loss_weight=0.3 lora_rank=4 lora_alpha=4 lora_target_modules=["to_q","to_k","to_v","to_out.0","conv1","conv2","time_emb_proj"]'
DEF='global_clip_loss_weight=0 num_epochs=10 l1_loss_weight=0.6 num_fixed_point_iterations=0 lora_rank=4 lora_alpha=4 lora_target_modules=["to_q","to_k","to_v","to_out.0","conv1","conv2","time_emb_proj"]'
P5="red:blue:circle green:yellow:triangle blue:red:square yellow:green:circle red:red:circle:square"
python $S --kind pixel --seed 0 --num-test 64 --pairs red:red:circle:square --edits $T400 $T500 --tag recommended --save-images $I --json build/rm27/shape500.jsonl
python $S --kind pixel --seed 13 --num-test 32 --pairs red:green:triangle red:blue:circle red:yellow:square green:red:square green:blue:square green:yellow:triangle blue:red:square blue:green:triangle blue:yellow:circle yellow:red:triangle yellow:green:circle yellow:blue:circle --edits $T400 $T500 --tag recommended --save-images $I --json build/rm27/pairs13.jsonl
python $S --kind pixel --seed 0 --num-test 64 --pairs $P5 --set $PREV --edits $T500 --tag previous --save-images $I --json build/rm27/previous.jsonl
python $S --kind pixel --seed 0 --num-test 64 --pairs $P5 --set $PREV --single-clip --edits $T500 --tag oneclip --save-images $I --json build/rm27/oneclip.jsonl
python $S --kind pixel --seed 0 --num-test 64 --pairs red:blue:circle --set $DEF --edits $T500 --tag defaults --save-images $I --json build/rm27/defaults.jsonl
python $S --kind pixel --seed 0 --num-test 64 --pairs red:blue:circle --set $DEF --single-clip --edits $T500 --tag defaults_oneclip --save-images $I --json build/rm27/defaults.jsonl
for s in 5 7 3 9 11; do
  python $S --kind pixel --seed $s --num-test 32 --pairs red:blue:circle --set $PREV --edits $T500 --tag previous --save-images $I --json build/rm27/previous.jsonl
  python $S --kind pixel --seed $s --num-test 32 --pairs red:blue:circle --set $PREV --single-clip --edits $T500 --tag oneclip --save-images $I --json build/rm27/oneclip.jsonl
done

# ---- issue 27 re-measurement, queue C: docs/fast.md's search table and the rows of "after the choice" not yet re-measured
export OMP_NUM_THREADS=1
S=scripts/testbed/fast_search.py; O=build/rm27/fast_search.jsonl; R=build/rm27/fast_report.jsonl; I=build/rm27/fast_img
python $S --finetunes today --edits today today_official few_4_6 --seeds 5 --out $O --save-images $I
python $S --finetunes one_step_noise one_step_noise_lr2e-3 --edits few_4_6 noise_6 --seeds 5 7 --out $O --save-images $I
python $S --finetunes one_step_noise_lr2e-3_b2 --edits few_5_5 noise_6 noise_10 --seeds 5 7 --out $O --save-images $I
python $S --finetunes one_step_noise_lr5e-3 --edits few_5_5 noise_6 --seeds 5 7 --out $O --save-images $I
python $S --finetunes one_step_noise_lr2e-3 --edits noise_6 noise_10 --seeds 0 --out $R --save-images $I
python $S --finetunes today --edits today noise_6 few_4_6 --seeds 0 --out $R --save-images $I
python $S --finetunes one_step_noise_e45_lr2e-3 --edits noise_6 --seeds 5 7 --out $O --save-images $I
python $S --finetunes one_step_noise_lr2e-3 --edits noise_6 --seeds 0 --pairs green:yellow:triangle --out $R --save-images $I
python $S --finetunes today --edits today noise_6 --seeds 0 --pairs green:yellow:triangle --out $R --save-images $I

# ---- issue 27, queue D (after C): testbed-experiments.md two-seed table, "the recommendation with global 0.25 / 0"
export OMP_NUM_THREADS=1
S=scripts/testbed/settings_search.py; I=build/rm27/img; J=build/rm27/twoseed.jsonl
P4="red:blue:circle green:yellow:triangle blue:red:square yellow:green:circle"
E="t500:t0=500,num_inversion_steps=40,num_inference_steps=40 t400:t0=400,num_inversion_steps=32,num_inference_steps=32"
for g in 0.25 0; do for s in 5 7; do
  python $S --kind pixel --seed $s --num-test 32 --pairs $P4 --set global_clip_loss_weight=$g --edits $E --tag global$g --save-images $I --json $J
done; done

# ---- issue 27, queue E (after D): testbed-experiments.md two-seed table, the recommendation with one change
export OMP_NUM_THREADS=1
S=scripts/testbed/settings_search.py; I=build/rm27/img; J=build/rm27/twoseed.jsonl
P4="red:blue:circle green:yellow:triangle blue:red:square yellow:green:circle"
E="t500:t0=500,num_inversion_steps=40,num_inference_steps=40 t400:t0=400,num_inversion_steps=32,num_inference_steps=32"
for s in 5 7; do
  python $S --kind pixel --seed $s --num-test 32 --pairs $P4 --set 'lora_target_modules=["to_q","to_k","to_v","to_out.0","conv1","conv2","time_emb_proj"]' --edits $E --tag with_time_emb_proj --save-images $I --json $J
done
python $S --kind pixel --seed 5 --num-test 32 --pairs $P4 --set l1_loss_weight=0.6 --edits $E --tag l1_0.6 --save-images $I --json $J
python $S --kind pixel --seed 5 --num-test 32 --pairs $P4 --set lora_rank=16 lora_alpha=16 --edits $E --tag rank16 --save-images $I --json $J
# stopped unfinished (time): python $S --kind pixel --seed 5 --num-test 32 --pairs $P4 --set num_epochs=20 --edits $E --tag epochs20 --save-images $I --json $J
