-- Argo CD health of a finetune.dev FineTuneJob, from status.phase and its conditions.
local phases = {
  Succeeded = "Healthy",
  Pending = "Progressing", Validating = "Progressing", Training = "Progressing",
  Evaluating = "Progressing", Deploying = "Progressing",
  Failed = "Degraded",
  Suspended = "Suspended",
}
-- The condition whose message explains each phase best.
local explaining = {
  Pending = "Validated", Validating = "Validated", Training = "Training",
  Evaluating = "Evaluated", Deploying = "Deployed", Succeeded = "Succeeded",
  Failed = "Failed", Suspended = "Suspended",
}
local hs = { status = "Progressing", message = "Waiting for the operator to pick the job up" }
if obj.status == nil or obj.status.phase == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = obj.status.phase
hs.status = phases[phase] or "Unknown"
hs.message = phase
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == explaining[phase] and condition.message ~= nil and condition.message ~= "" then
      hs.message = phase .. ": " .. condition.message
    end
  end
end
if phase == "Training" and obj.status.progress ~= nil and obj.status.progress.percent ~= nil then
  hs.message = hs.message .. " (" .. obj.status.progress.percent .. "%)"
end
return hs
