-- wrk script: every request writes a key of its own, unique across wrk runs on the
-- same server too (RUN names the run: the harness gives each one its own); a share of
-- them (FAIL_EVERY) carry a malformed multipart body, which a stash with part: refuses
-- (400: rollback).
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   thread_id = id
   body = string.rep("x", tonumber(os.getenv("BODY_BYTES") or "1024"))
   fail_every = tonumber(os.getenv("FAIL_EVERY") or "0")
   run = os.getenv("RUN") or "r"
end

function request()
   counter = counter + 1
   local path = string.format("/items/%s-t%d-%d", run, thread_id, counter)
   if fail_every > 0 and counter % fail_every == 0 then
      return wrk.format("PUT", path, {["Content-Type"] = "multipart/form-data; boundary=zz"}, body)
   end
   return wrk.format("PUT", path, {["Content-Type"] = "application/octet-stream"}, body)
end
