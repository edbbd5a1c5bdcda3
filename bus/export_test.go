package bus

// SetIndexedHook has r run f between its look at FM_COMMANDS's subject
// index and its reads (tests of what is stored meanwhile).
func SetIndexedHook(r *CommandReader, f func()) { r.indexed = f }
