-- wrk script: spread requests round robin over an explicit list of paths; count X-Cache.
--
--   wrk -c 64 -t 2 -d 5s --latency -s bench/wrk/paths.lua http://127.0.0.1:PORT -- /products/1 /products/2
--
-- args: the paths. Each thread starts elsewhere in the cycle. Every response's
-- X-Cache value is counted and printed as one line at the end, in the format
-- bench/common.py's parse_wrk reads: "XCACHE HIT=123 MISS=4".
-- (bench/wrk/ids.lua builds PREFIX0 .. PREFIX<n-1>; the sample shop's products
-- are 1..5, so bench/faults.py needs explicit paths.)

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   paths = {}
   for i, path in ipairs(args) do
      paths[i - 1] = wrk.format("GET", path)
   end
   npaths = #args
   if npaths == 0 then
      paths[0] = wrk.format("GET", "/")
      npaths = 1
   end
   counter = (tid or 0) * 3
   counts = {}
end

function request()
   counter = counter + 1
   return paths[counter % npaths]
end

function response(status, headers, body)
   local value = headers["x-cache"] or headers["X-Cache"] or "none"
   counts[value] = (counts[value] or 0) + 1
end

function done(summary, latency, requests)
   local total = {}
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      if c then
         for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
      end
   end
   local parts = {}
   for k, v in pairs(total) do table.insert(parts, k .. "=" .. v) end
   table.sort(parts)
   io.write("XCACHE " .. table.concat(parts, " ") .. "\n")
end
