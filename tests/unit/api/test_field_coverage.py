"""Every spec field of both CRDs either has a test of its effect or is refused at admission
(issue 17). The fields are walked from `finetune_api.schema`; a new field fails this test until
it is listed in EFFECT_TESTS (field -> the node id of a test that shows what it does; the test
checks the node exists) or REFUSED (field -> the id of an INVALID_JOBS / INVALID_SERVICES case
of tests/cluster/test_api_admission.py that the API server refuses).

KNOWN_GAPS lists the fields the audit has not yet tied to an effect test, each with what is
missing (empty since issue 17 was closed out; keep it so). A field listed there that gains an
entry above fails the test until it is removed from the gaps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from finetune_api import schema

TESTS = Path(__file__).resolve().parents[2]

# field -> test node id ("path::function", relative to tests/)
EFFECT_TESTS: dict[str, str] = {
    # model
    "spec.model.source": "e2e/test_s3_end_to_end.py::test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back",
    "spec.model.revision": "unit/trainer/test_trainer_setup.py::test_hub_sources_take_revision_and_token_from_env",
    "spec.model.tokenSecretRef.name": "cluster/test_operator_lifecycle.py::test_missing_secret_waits_and_creating_it_lets_the_job_start",
    "spec.model.tokenSecretRef.key": "unit/trainer/test_trainer_setup.py::test_hub_sources_take_revision_and_token_from_env",
    # method
    "spec.method.type": "unit/trainer/test_trainer_run.py::test_full_fine_tuning_lowers_the_loss_and_writes_a_merged_model",
    "spec.method.objective": "unit/trainer/test_dpo_training.py::test_lora_dpo_learns_the_preference_and_reports_it",
    "spec.method.lora.r": "e2e/test_s3_end_to_end.py::test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back",
    "spec.method.lora.targetModules": "unit/trainer/test_trainer_setup.py::test_lora_targets_vllm_cannot_serve_are_refused",
    "spec.method.quantization.quantType": "unit/trainer/test_trainer_run.py::test_qlora_trains_on_cuda",
    "spec.method.dpo.beta": "unit/trainer/test_dpo_training.py::test_dpo_hyperparameters_reach_trls_config",
    "spec.method.dpo.lossType": "unit/trainer/test_dpo_training.py::test_dpo_hyperparameters_reach_trls_config",
    "spec.method.dpo.maxPromptLength": "unit/data/test_preference_format.py::test_prompt_and_completion_limits_cut_pairs_and_are_reported",
    "spec.method.dpo.maxCompletionLength": "unit/data/test_preference_format.py::test_prompt_and_completion_limits_cut_pairs_and_are_reported",
    # dataset
    "spec.dataset.source": "e2e/test_s3_end_to_end.py::test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back",
    "spec.dataset.format": "unit/trainer/test_trainer_run.py::test_chat_and_text_datasets_train",
    "spec.dataset.fieldMap": "unit/trainer/test_data_formats.py::test_field_map_renames_instruction_columns",
    "spec.dataset.evalFraction": "unit/trainer/test_data_prepare.py::test_split_is_deterministic_for_a_seed_and_changes_with_it",
    "spec.dataset.maxEvalExamples": "unit/trainer/test_data_prepare.py::test_the_held_out_set_is_capped_by_max_eval_examples",
    "spec.dataset.evalSource": "unit/trainer/test_data_prepare.py::test_eval_source_is_used_and_leaked_records_leave_train",
    "spec.dataset.dedup.exact": "unit/trainer/test_data_clean.py::test_exact_duplicates_are_removed_on_normalised_text",
    "spec.dataset.dedup.nearThreshold": "unit/trainer/test_field_effects.py::test_near_threshold_one_disables_near_dedup",
    "spec.dataset.minExamples": "unit/trainer/test_data_validate_cli.py::test_too_few_examples_exits_2",
    "spec.dataset.maxInvalidFraction": "unit/trainer/test_data_validate_cli.py::test_bad_records_within_max_invalid_fraction_are_dropped",
    "spec.dataset.lengthPolicy": "unit/trainer/test_data_clean.py::test_drop_policy_drops_what_is_too_long",
    "spec.dataset.categoryField": "unit/trainer/test_data_prepare.py::test_category_balance_is_reported_and_imbalance_warned",
    "spec.dataset.mix.source": "unit/trainer/test_data_prepare.py::test_mix_in_is_appended_to_train_deterministically",
    "spec.dataset.mix.ratio": "unit/trainer/test_data_prepare.py::test_mix_in_is_appended_to_train_deterministically",
    "spec.dataset.mix.format": "unit/trainer/test_field_effects.py::test_a_mix_without_format_takes_the_datasets_format",
    "spec.dataset.chatTemplate.name": "unit/trainer/test_chat_template_validation.py::test_named_templates_replace_the_models_own",
    "spec.dataset.chatTemplate.file": "unit/trainer/test_chat_template_validation.py::test_a_template_file_on_the_claim_is_the_tokenizers_template",
    "spec.dataset.chatTemplate.lossOn": "unit/trainer/test_chat_template_masks.py::test_loss_on_all_trains_the_whole_rendering",
    # training
    "spec.training.maxSteps": "e2e/test_operator_realrun.py::test_the_local_node_trains_the_tiny_model_and_the_job_succeeds",
    "spec.training.learningRate": "unit/trainer/test_trainer_run.py::test_absurd_learning_rate_diverges_with_permanent_exit",
    "spec.training.packing": "unit/trainer/test_trainer_masks.py::test_packing_auto_packs_only_with_cuda",
    "spec.training.sharding": "unit/trainer/test_fsdp_sharding.py::test_fsdp_full_fine_tuning_resumes_from_its_sharded_checkpoint_after_sigkill",
    "spec.training.precision": "unit/trainer/test_trainer_masks.py::test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32",
    "spec.training.saveTotalLimit": "unit/trainer/test_trainer_checkpoints.py::test_rotation_keeps_last_k_and_the_best",
    "spec.training.saveSteps": "unit/trainer/test_trainer_run.py::test_killed_run_resumes_from_last_complete_checkpoint",
    "spec.training.earlyStopping.patience": "unit/trainer/test_trainer_setup.py::test_early_stopping_and_guards_are_installed",
    "spec.training.metricForBestModel": "unit/trainer/test_field_effects.py::test_perplexity_picks_the_best_checkpoint_as_the_lowest_eval_loss",
    "spec.training.seed": "unit/trainer/test_data_prepare.py::test_split_is_deterministic_for_a_seed_and_changes_with_it",
    "spec.training.lossSpikeFactor": "unit/trainer/test_trainer_setup.py::test_early_stopping_and_guards_are_installed",
    "spec.evaluation.metrics": "unit/trainer/test_field_effects.py::test_evaluation_metrics_score_the_eval_set_not_only_prompts",
    "spec.evaluation.prompts[].prompt": "unit/trainer/test_field_effects.py::test_evaluation_prompts_are_answered_by_both_models_within_max_new_tokens",
    "spec.evaluation.prompts[].reference": "unit/trainer/test_field_effects.py::test_evaluation_prompts_are_answered_by_both_models_within_max_new_tokens",
    "spec.evaluation.maxNewTokens": "unit/trainer/test_field_effects.py::test_evaluation_prompts_are_answered_by_both_models_within_max_new_tokens",
    "spec.evaluation.comparison.enabled": "unit/operator/test_comparison_approval.py::test_disabled_comparison_goes_straight_on",
    "spec.evaluation.comparison.sampleSize": "e2e/test_operator_realrun.py::test_the_local_node_trains_the_tiny_model_and_the_job_succeeds",
    "spec.model.trustRemoteCode": "unit/trainer/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapter_and_early_stopping_takes_its_threshold",
    "spec.method.lora.alpha": "unit/trainer/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapter_and_early_stopping_takes_its_threshold",
    "spec.method.lora.dropout": "unit/trainer/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapter_and_early_stopping_takes_its_threshold",
    "spec.training.earlyStopping.threshold": "unit/trainer/test_field_effects.py::test_lora_alpha_and_dropout_shape_the_adapter_and_early_stopping_takes_its_threshold",
    # resources
    "spec.resources.gpusPerNode": "cluster/test_operator_lifecycle.py::test_more_gpus_than_any_node_fails_when_the_cluster_cannot_grow",
    "spec.resources.nodes": "unit/operator/test_builders_manifests.py::test_multi_node_trainer_job_is_indexed_through_the_launcher_and_queued_for_kueue",
    "spec.resources.cpu": "unit/operator/test_object_storage_operator.py::test_resources_cpu_is_both_request_and_limit",
    "spec.resources.queueName": "unit/operator/test_builders_manifests.py::test_multi_node_trainer_job_is_indexed_through_the_launcher_and_queued_for_kueue",
    "spec.resources.activeDeadlineSeconds": "unit/operator/test_builders_status.py::test_deadline_exceeded",
    # storage
    "spec.storage.existingClaim": "unit/operator/test_builders_manifests.py::test_existing_claim_is_neither_created_nor_owned",
    "spec.storage.accessModes": "unit/operator/test_builders_manifests.py::test_multi_node_claim_is_read_write_many",
    "spec.storage.reclaimPolicy": "cluster/test_operator_lifecycle.py::test_deleting_the_job_keeps_or_deletes_the_claim",
    # output, object storage
    "spec.output.merge": "unit/trainer/test_trainer_run.py::test_full_fine_tuning_lowers_the_loss_and_writes_a_merged_model",
    "spec.output.push.uri": "e2e/test_s3_end_to_end.py::test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back",
    "spec.output.push.private": "unit/trainer/test_hub_push.py::test_a_public_repo_when_asked",
    "spec.output.resultsFile": "cluster/test_openai_api_e2e.py::test_quickstart_uploads_trains_lists_checkpoints_and_chats",
    "spec.output.push.tokenSecretRef.name": "unit/trainer/test_hub_push.py::test_push_to_the_hub_creates_a_private_repo_and_commits_card_and_adapter",
    "spec.output.push.tokenSecretRef.key": "unit/trainer/test_hub_push.py::test_push_to_the_hub_creates_a_private_repo_and_commits_card_and_adapter",
    "spec.objectStorage.secretRef.name": "e2e/test_s3_end_to_end.py::test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back",
    # tracking
    "spec.tracking.mlflow.trackingUri": "cluster/test_tracking_mlflow_cluster.py::test_a_finetunejob_with_mlflow_tracking_logs_its_run_to_the_dev_clusters_mlflow",
    "spec.tracking.mlflow.secretRef.name": "unit/observability/test_tracking_spec.py::test_trainer_gets_tracker_credentials_from_named_secret_keys_only",
    "spec.tracking.tensorboard.enabled": "unit/trainer/test_tracking_units.py::test_only_the_named_and_enabled_trackers_start",
    "spec.tracking.wandb.mode": "unit/trainer/test_tracking_units.py::test_wandb_auto_mode_goes_online_only_with_a_key_and_a_reachable_base_url",
    "spec.tracking.wandb.baseUrl": "unit/trainer/test_tracking_units.py::test_wandb_auto_mode_goes_online_only_with_a_key_and_a_reachable_base_url",
    "spec.tracking.wandb.apiKeySecretRef.name": "unit/observability/test_tracking_spec.py::test_trainer_gets_tracker_credentials_from_named_secret_keys_only",
    "spec.tracking.logAdapter": "unit/trainer/test_trainer_tracking.py::test_mlflow_tensorboard_and_wandb_record_params_per_step_loss_and_artifacts",
    # lifecycle
    "spec.suspend": "cluster/test_operator_lifecycle.py::test_suspend_stops_the_trainer_and_resume_starts_it_again",
    "spec.ttlSecondsAfterFinished": "cluster/test_operator_lifecycle.py::test_ttl_after_finished_deletes_the_job_and_keeps_a_retained_claim",
    "spec.training.epochs": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.perDeviceBatchSize": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.gradientAccumulationSteps": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.lrScheduler": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.warmupSteps": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.warmupRatio": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.weightDecay": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.optimizer": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.maxGradNorm": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.gradientCheckpointing": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.loggingSteps": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.training.evalSteps": "unit/trainer/test_field_effects.py::test_training_hyperparameters_reach_the_training_arguments",
    "spec.resources.memory": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.nodeSelector": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.tolerations[].key": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.tolerations[].operator": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.tolerations[].value": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.tolerations[].effect": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.resources.priorityClassName": "unit/operator/test_builders_manifests.py::test_single_node_trainer_job",
    "spec.storage.size": "unit/operator/test_builders_manifests.py::test_workspace_claim_is_owned_only_with_reclaim_policy_delete",
    "spec.storage.storageClassName": "unit/operator/test_builders_manifests.py::test_workspace_claim_is_owned_only_with_reclaim_policy_delete",
    "spec.deploy.requireApproval": "cluster/test_approval_gate.py::test_a_gated_job_waits_then_deploys_once_approved",
    "spec.deploy.inferenceService": "unit/operator/test_inference_checks.py::test_a_job_deployed_to_a_server_of_its_own_name_serves_the_base_as_name_base",
    # deploy: applied to a new or an existing InferenceService
    "spec.deploy.replicas": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    "spec.deploy.gpus": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    "spec.deploy.nodeSelector": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    "spec.deploy.vllm.maxLoraRank": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    "spec.deploy.vllm.maxModelLen": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    "spec.deploy.vllm.dtype": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits",
    **{f"spec.deploy.tolerations[].{k}": "cluster/test_deploy_into_existing_server.py::test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits"
       for k in ("key", "operator", "value", "effect")},
    "spec.deploy.tolerations[].tolerationSeconds": "unit/operator/test_deploy_settings.py::test_every_deploy_field_reaches_the_inferenceservice_spec_and_its_deployment",
    **{f"spec.deploy.vllm.{k}": "unit/operator/test_deploy_settings.py::test_every_deploy_field_reaches_the_inferenceservice_spec_and_its_deployment"
       for k in ("image", "servedModelName", "gpuMemoryUtilization", "tensorParallelSize", "maxLoras",
                 "extraArgs")},
    # the rest of the audit (issue 17)
    "spec.method.quantization.bits": "unit/trainer/test_field_audit_effects.py::test_quantization_fields_shape_the_bitsandbytes_config",
    "spec.method.quantization.doubleQuant": "unit/trainer/test_field_audit_effects.py::test_quantization_fields_shape_the_bitsandbytes_config",
    "spec.method.quantization.computeDtype": "unit/trainer/test_field_audit_effects.py::test_quantization_fields_shape_the_bitsandbytes_config",
    "spec.dataset.split": "unit/trainer/test_field_audit_effects.py::test_dataset_split_is_the_split_asked_of_a_hub_dataset",
    "spec.training.maxSeqLength": "unit/trainer/test_field_audit_effects.py::test_max_seq_length_is_trls_max_length",
    "spec.resources.tolerations[].tolerationSeconds": "unit/operator/test_placement_fields.py::test_trainer_pods_take_the_affinity_toleration_seconds_and_image_of_the_spec",
    "spec.resources.affinity": "unit/operator/test_placement_fields.py::test_trainer_pods_take_the_affinity_toleration_seconds_and_image_of_the_spec",
    "spec.resources.image": "unit/operator/test_placement_fields.py::test_trainer_pods_take_the_affinity_toleration_seconds_and_image_of_the_spec",
    "spec.tracking.mlflow.experiment": "unit/trainer/test_trainer_tracking.py::test_mlflow_tensorboard_and_wandb_record_params_per_step_loss_and_artifacts",
    "spec.tracking.wandb.project": "unit/trainer/test_trainer_tracking.py::test_mlflow_tensorboard_and_wandb_record_params_per_step_loss_and_artifacts",
    "spec.tracking.wandb.entity": "unit/trainer/test_trainer_tracking.py::test_mlflow_tensorboard_and_wandb_record_params_per_step_loss_and_artifacts",
    "spec.tracking.wandb.apiKeySecretRef.key": "unit/observability/test_tracking_spec.py::test_trainer_gets_tracker_credentials_from_named_secret_keys_only",
}

INFERENCE_EFFECT_TESTS: dict[str, str] = {
    "spec.model.source": "e2e/test_vllm_real.py::test_inferenceservice_on_the_local_node_really_serves_the_adapter",
    "spec.adapters[].fineTuneJobRef.name": "cluster/test_inference_cluster.py::test_waits_for_a_finetunejob_then_serves_its_adapter",
    "spec.mergedModel.fineTuneJobRef.name": "unit/operator/test_inference_builders.py::test_merged_model_of_a_full_job_is_the_served_model",
    "spec.replicas": "unit/operator/test_inference_builders.py::test_pdb_only_when_more_than_one_replica",
    "spec.resources.gpus": "unit/operator/test_inference_builders.py::test_gpus_are_limits_and_gpu_taints_are_tolerated",
    "spec.resources.memory": "unit/operator/test_inference_builders.py::test_cpu_serving_sizes_the_kv_cache_from_memory_and_asks_for_no_gpu",
    "spec.vllm.image": "unit/operator/test_inference_builders.py::test_the_operators_vllm_image_is_used_unless_the_spec_names_one",
    "spec.vllm.maxLoraRank": "unit/operator/test_inference_checks.py::test_rank_above_max_lora_rank_is_refused",
    "spec.model.tokenSecretRef.name": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.model.tokenSecretRef.key": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.adapters[].name": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.adapters[].path": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.resources.cpu": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.resources.nodeSelector": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.servedModelName": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.maxModelLen": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.gpuMemoryUtilization": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.tensorParallelSize": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.maxLoras": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.vllm.dtype": "unit/operator/test_inference_builders.py::test_rendered_children_match_golden_files",
    "spec.autoscaling.maxReplicas": "cluster/test_autoscaling_objects.py::test_the_rendered_hpa_is_accepted_and_kept_by_the_api_server",
    "spec.autoscaling.targetRequestsWaiting": "cluster/test_autoscaling_objects.py::test_the_rendered_hpa_is_accepted_and_kept_by_the_api_server",
    "spec.autoscaling.minReplicas": "cluster/test_autoscaling_objects.py::test_min_replicas_zero_renders_a_floor_of_one_because_the_api_server_refuses_zero",
    "spec.vllm.extraArgs": "faults/test_security_shell.py::test_vllm_command_carries_extra_args_as_whole_escaped_elements",
    "spec.model.revision": "unit/operator/test_placement_fields.py::test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields",
    "spec.model.trustRemoteCode": "unit/operator/test_placement_fields.py::test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields",
    "spec.mergedModel.path": "unit/operator/test_placement_fields.py::test_a_merged_model_path_on_a_claim_is_mounted_and_served",
    **{f"spec.resources.tolerations[].{k}": "unit/operator/test_placement_fields.py::test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields"
       for k in ("key", "operator", "value", "effect", "tolerationSeconds")},
    "spec.resources.affinity": "unit/operator/test_placement_fields.py::test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields",
    "spec.resources.priorityClassName": "unit/operator/test_placement_fields.py::test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields",
}

# serving (#21): promotion gated on evaluation.
INFERENCE_EFFECT_TESTS.update({
    "spec.adapters[].promotion.metric": "cluster/test_runtime_adapters_cluster.py::test_a_worse_version_is_refused_and_the_current_one_keeps_answering",
    "spec.adapters[].promotion.requireImprovementOver": "cluster/test_runtime_adapters_cluster.py::test_a_worse_version_is_refused_and_the_current_one_keeps_answering",
    "spec.adapters[].promotion.margin": "unit/operator/test_runtime_adapters.py::test_a_candidate_is_promoted_only_when_it_beats_the_current_version_by_the_margin",
})
EFFECT_TESTS["spec.deploy.adapterName"] = "unit/operator/test_runtime_adapters.py::test_a_job_deploying_under_a_served_name_is_a_new_version_and_ends_not_promoted_when_refused"

# field -> (kind, the id of a refused case in tests/cluster/test_api_admission.py)
REFUSED: dict[str, str] = {
    "spec.method.lora.bias": "lora-bias",
}

KNOWN_GAPS: dict[str, str] = {}
INFERENCE_KNOWN_GAPS: dict[str, str] = {}


def leaf_fields(node: dict, path: str = "spec"):
    """Every field that holds a value: scalars, lists of scalars, maps and free-form objects."""
    props, items = node.get("properties"), node.get("items")
    if props:
        for key, child in props.items():
            yield from leaf_fields(child, f"{path}.{key}")
    elif items is not None and items.get("properties"):
        yield from leaf_fields(items, f"{path}[]")
    else:
        yield path


def spec_of(kind: str) -> dict:
    crd = next(c for c in schema.all_crds() if c["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def node_exists(node_id: str) -> bool:
    path, _, name = node_id.partition("::")
    file = TESTS / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
               for n in tree.body)


def refused_case_ids() -> set[str]:
    tree = ast.parse((TESTS / "cluster" / "test_api_admission.py").read_text())
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("INVALID_JOBS", "INVALID_SERVICES")
                                                for t in node.targets):
            for case in node.value.elts:
                if isinstance(case, ast.Tuple) and isinstance(case.elts[0], ast.Constant):
                    ids.add(case.elts[0].value)
    return ids


CASES = [("FineTuneJob", EFFECT_TESTS, REFUSED, KNOWN_GAPS),
         ("InferenceService", INFERENCE_EFFECT_TESTS, {}, INFERENCE_KNOWN_GAPS)]


@pytest.mark.parametrize("kind, effects, refused, gaps", CASES, ids=[c[0] for c in CASES])
def test_every_spec_field_has_an_effect_test_or_is_refused_at_admission(kind, effects, refused, gaps):
    fields = list(leaf_fields(spec_of(kind)))
    unaccounted = [f for f in fields if f not in effects and f not in refused and f not in gaps]
    assert not unaccounted, (f"{kind} fields with neither a test of their effect nor an admission "
                             f"refusal: {unaccounted}")
    closed = [f for f in gaps if f in effects or f in refused]
    assert not closed, f"covered now, remove from the known gaps: {closed}"
    unknown = [f for f in [*effects, *refused, *gaps] if f not in fields]
    assert not unknown, f"not a field of {kind}: {unknown}"


@pytest.mark.parametrize("kind, effects, refused, gaps", CASES, ids=[c[0] for c in CASES])
def test_every_listed_test_exists(kind, effects, refused, gaps):
    missing = [node for node in effects.values() if not node_exists(node)]
    assert not missing, f"listed effect tests that do not exist: {missing}"
    cases = refused_case_ids()
    assert not [c for c in refused.values() if c not in cases]


def test_no_field_is_left_as_a_known_gap():
    assert not KNOWN_GAPS and not INFERENCE_KNOWN_GAPS, "every accepted field works or is refused"
