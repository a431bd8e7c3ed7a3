-- Argument reading, first in every anchorflow script (protocol/scripts.rs writes the
-- arguments in the order each script reads them). `i` is the cursor into ARGV;
-- next_arg() and next_int() read and advance it. Every argument list ends with the
-- marker '.end': check_end() fails the script when the cursor is not exactly at it,
-- and every script calls it before its first write, so a builder and a script that
-- disagree are an error that changed nothing, never a misread.
local i = 1

local function next_arg()
  local value = ARGV[i]
  i = i + 1
  return value
end

local function next_int()
  return tonumber(next_arg())
end

local function check_end()
  if ARGV[i] ~= '.end' or i ~= #ARGV then
    return error('anchorflow: script arguments do not match their layout (argument ' .. i .. ' of ' .. #ARGV .. ')')
  end
end

-- ARGV[k] as a number, for a walk over counts before the first write: an argument
-- that is not one means the layout does not match.
local args_ = ARGV
local function int_at(k)
  return tonumber(args_[k]) or error('anchorflow: script arguments do not match their layout (argument ' .. k .. ' is not a number)')
end
