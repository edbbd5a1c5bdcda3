package protocol

import "strings"

// CompareVersions orders dotted DSS versions numerically ("14.0.0" >
// "9.2.1"), returning -1, 0 or +1; a suffix after the numbers only breaks
// ties. The agent uses it to refuse downgrades, the server to sort images.
func CompareVersions(a, b string) int {
	pa, pb := splitVersion(a), splitVersion(b)
	for i := 0; i < max(len(pa.nums), len(pb.nums)); i++ {
		var x, y int
		if i < len(pa.nums) {
			x = pa.nums[i]
		}
		if i < len(pb.nums) {
			y = pb.nums[i]
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return strings.Compare(pa.rest, pb.rest)
}

type version struct {
	nums []int
	rest string
}

func splitVersion(v string) version {
	var out version
	n, digits := 0, false
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= '0' && c <= '9':
			n, digits = n*10+int(c-'0'), true
		case c == '.' && digits:
			out.nums = append(out.nums, n)
			n, digits = 0, false
		default:
			if digits {
				out.nums = append(out.nums, n)
			}
			out.rest = v[i:]
			return out
		}
	}
	if digits {
		out.nums = append(out.nums, n)
	}
	return out
}
