-- Argo CD health of a finetune.dev InferenceService, from status.phase and its conditions.
local phases = {
  Ready = "Healthy",
  Pending = "Progressing", Progressing = "Progressing",
  Degraded = "Degraded", Failed = "Degraded",
}
local hs = { status = "Progressing", message = "Waiting for the operator to pick the service up" }
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
-- Degraded explains a Degraded or Failed service; Ready explains everything else.
local explaining = "Ready"
if hs.status == "Degraded" then
  explaining = "Degraded"
end
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == explaining and condition.message ~= nil and condition.message ~= "" then
      hs.message = phase .. ": " .. condition.message
    end
  end
end
return hs
