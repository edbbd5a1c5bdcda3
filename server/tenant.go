package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/fleetmanager/fm/api"
)

// Keys of tenant settings in fm_settings.
func settingsKey(tenant, name string) string { return tenant + "." + name }

const (
	settingCloudTags   = "cloudtags"
	settingCredentials = "credentials"
)

// getCloudTags serves GET /cloud-tags: the tag map serialised as a JSON
// string in "msg", which is what Dataiku's client parses.
func (s *Server) getCloudTags(r *http.Request) (any, error) {
	doc, _, _ := s.st.settings.get(settingsKey(api.DefaultTenant, settingCloudTags))
	return cloudTagsResponse(doc.CloudTags), nil
}

func cloudTagsResponse(tags map[string]string) api.CloudTagsResponse {
	if tags == nil {
		tags = map[string]string{}
	}
	b, _ := json.Marshal(tags)
	return api.CloudTagsResponse{Msg: string(b)}
}

// putCloudTags serves PUT /cloud-tags, whose body is the bare tag map.
func (s *Server) putCloudTags(r *http.Request) (any, error) {
	var tags map[string]string
	if err := readJSON(r, &tags); err != nil {
		return nil, err
	}
	if tags == nil {
		tags = map[string]string{}
	}
	var c checker
	c.cloudTags("cloudTags", tags)
	if err := c.err("cloud tags"); err != nil {
		return nil, err
	}
	key := settingsKey(api.DefaultTenant, settingCloudTags)
	if err := s.storeSetting(r, key, settingsDoc{CloudTags: tags}); err != nil {
		return nil, err
	}
	return cloudTagsResponse(tags), nil
}

func (s *Server) getCloudCredentials(r *http.Request) (any, error) {
	cc := s.cloudCredentials()
	redactCredentials(&cc)
	if isViewer(r) {
		cc.License = redacted(cc.License)
	}
	return cc, nil
}

// cloudCredentials returns the stored credentials, secrets included, or the
// defaults (FM's own identity, no license).
func (s *Server) cloudCredentials() api.CloudCredentials {
	doc, _, ok := s.st.settings.get(settingsKey(api.DefaultTenant, settingCredentials))
	if !ok || doc.Credentials == nil {
		return api.CloudCredentials{AWSAuthenticationMode: api.AWSAuthSameAsFM, LicenseMode: api.LicenseStatic}
	}
	return *doc.Credentials
}

func redactCredentials(cc *api.CloudCredentials) {
	cc.AWSSecretAccessKey = ""
	cc.LicenseToken = ""
}

func (s *Server) putCloudCredentials(r *http.Request) (any, error) {
	var cc api.CloudCredentials
	if err := readJSON(r, &cc); err != nil {
		return nil, err
	}
	cur := s.cloudCredentials()
	// Secrets are write-only; an echoed object does not carry them.
	if cc.AWSSecretAccessKey == "" {
		cc.AWSSecretAccessKey = cur.AWSSecretAccessKey
	}
	if cc.LicenseToken == "" {
		cc.LicenseToken = cur.LicenseToken
	}
	defaultString(&cc.AWSAuthenticationMode, api.AWSAuthSameAsFM)
	defaultString(&cc.LicenseMode, api.LicenseStatic)
	if cc.AWSAuthenticationMode != api.AWSAuthKeypair {
		cc.AWSAccessKeyID, cc.AWSSecretAccessKey = "", ""
	}
	if cc.AWSAuthenticationMode != api.AWSAuthIAMRole {
		cc.AWSIAMRoleARN = ""
	}
	if cc.LicenseMode != api.LicenseAutoUpdate {
		cc.LicenseToken = ""
	}
	var c checker
	c.oneOf("awsAuthenticationMode", cc.AWSAuthenticationMode, api.AWSAuthSameAsFM, api.AWSAuthIAMRole, api.AWSAuthKeypair)
	checkAWSIdentity(&c, cc.AWSAuthenticationMode, cc.AWSIAMRoleARN, cc.AWSAccessKeyID, cc.AWSSecretAccessKey)
	c.match("awsCMKId", cc.AWSCMKID, reKMSKey, "a KMS key id, ARN or alias")
	c.oneOf("licenseMode", cc.LicenseMode, api.LicenseStatic, api.LicenseAutoUpdate)
	if cc.LicenseMode == api.LicenseStatic && cc.License != "" {
		var lic map[string]any
		if err := json.Unmarshal([]byte(cc.License), &lic); err != nil {
			c.fail("license", "must be a JSON object in a string: %v", err)
		}
	}
	if cc.LicenseMode == api.LicenseAutoUpdate {
		c.required("licenseToken", cc.LicenseToken)
	}
	if err := c.err("cloud credentials"); err != nil {
		return nil, err
	}
	cc.UpdatedAt = time.Now().UTC()
	if err := s.storeSetting(r, settingsKey(api.DefaultTenant, settingCredentials), settingsDoc{Credentials: &cc}); err != nil {
		return nil, err
	}
	redactCredentials(&cc)
	return cc, nil
}

// storeSetting writes a setting with a revision check against the copy the
// request was validated with.
func (s *Server) storeSetting(r *http.Request, key string, doc settingsDoc) error {
	_, rev, ok := s.st.settings.get(key)
	var err error
	if ok {
		_, err = s.st.settings.update(r.Context(), key, doc, rev)
	} else {
		_, err = s.st.settings.create(r.Context(), key, doc)
	}
	if errors.Is(err, errConflict) || errors.Is(err, errExists) {
		return conflict("the setting was changed by someone else meanwhile; retry")
	}
	if err != nil {
		return unavailable(err, "the setting could not be stored")
	}
	return nil
}
